// Symbol and token models: each key typed is one step of the session over the WebSocket,
// and the model's five most probable next symbols are shown after every answer.

const TOP = 5;

/** Whether a card is driven by typing: one character per symbol of its vocabulary. */
export function typeable(card) {
  const vocabulary = card.vocabulary || [];
  return vocabulary.length > 0 && vocabulary.every((s) => [...s].length === 1);
}

function visible(symbol) {
  return { " ": "␣", "\n": "⏎", "\t": "⇥" }[symbol] ?? symbol;
}

/** The outputs of one step as probabilities (softmax over logits when the card has none). */
function probabilities(card, row) {
  if (card.output_activation !== "identity") return row;
  const top = Math.max(...row);
  const exp = row.map((v) => Math.exp(v - top));
  const total = exp.reduce((a, b) => a + b, 0);
  return exp.map((v) => v / total);
}

function outputNames(card) {
  if (card.labels) return card.labels;
  return card.vocabulary && card.vocabulary.length === card.output_size ? card.vocabulary : null;
}

/** The best ``k`` of one step's full output row, best first (ties by index). */
export function topCandidates(card, row, k = TOP) {
  const names = outputNames(card);
  const p = probabilities(card, row);
  return p
    .map((probability, index) => ({ symbol: names ? names[index] : String(index), probability, index }))
    .sort((a, b) => b.probability - a.probability || a.index - b.index)
    .slice(0, k);
}

/** Softmax outputs are probabilities: the server picks the best k (``top_k``). Other
 * outputs come in full and are turned into probabilities here. */
function askTopK(card) {
  return card.output_activation === "softmax" ? { top_k: TOP } : {};
}

function candidatesOf(card, answer) {
  if (!answer.top_k) return topCandidates(card, answer.outputs[answer.outputs.length - 1]);
  const names = outputNames(card);
  return answer.top_k[answer.top_k.length - 1].map((c) => ({
    symbol: c.label ?? (names ? names[c.index] : String(c.index)),
    probability: c.score,
    index: c.index,
  }));
}

export class SymbolPanel {
  constructor(root, session, showError) {
    this.session = session;
    this.card = session.card;
    this.showError = showError;
    this.applied = ""; // what the session has consumed since it was opened or reset
    this.pumping = false;
    this.symbols = new Map();
    for (const symbol of this.card.vocabulary) this.symbols.set(symbol, symbol);
    root.replaceChildren(this.build());
  }

  build() {
    const template = document.getElementById("symbol-panel");
    const panel = template.content.cloneNode(true);
    this.input = panel.querySelector('[data-testid="type-input"]');
    this.keys = panel.querySelector('[data-testid="next-keys"]');
    this.generateButton = panel.querySelector('[data-testid="generate"]');
    this.steps = panel.querySelector('[data-testid="generate-steps"]');
    this.temperature = panel.querySelector('[data-testid="generate-temperature"]');
    panel.querySelector(".vocabulary").textContent = this.card.vocabulary.map(visible).join(" ");
    this.input.addEventListener("input", () => this.pump());
    this.generateButton.disabled = !this.card.generation;
    this.generateButton.addEventListener("click", () => this.generate());
    return panel;
  }

  /** A typed character as a symbol: itself, or its other case when only that is known. */
  symbolOf(character) {
    for (const candidate of [character, character.toUpperCase(), character.toLowerCase()]) {
      if (this.symbols.has(candidate)) return candidate;
    }
    return character; // unknown: the server refuses it with invalid_input
  }

  normalise() {
    const text = [...this.input.value].map((c) => this.symbolOf(c)).join("");
    if (text !== this.input.value) this.input.value = text;
    return text;
  }

  /** Brings the session level with the text box, one step (one message) per character. */
  pump() {
    if (this.pumping) return;
    this.pumping = true;
    this.session
      .exclusive(async () => {
        for (;;) {
          const wanted = this.normalise();
          if (wanted === this.applied) return;
          if (!wanted.startsWith(this.applied)) {
            // An edit before the end: the state cannot step back, so start over and
            // feed the text again.
            await this.session.reset();
            this.applied = "";
            this.renderKeys([]);
            continue;
          }
          const character = [...wanted.slice(this.applied.length)][0];
          try {
            const answer = await this.session.step([character], askTopK(this.card));
            this.applied += character;
            this.renderKeys(candidatesOf(this.card, answer));
            this.showError(null);
          } catch (error) {
            // Refused (e.g. an unknown symbol): the state is untouched, so drop the key.
            const text = this.input.value;
            this.input.value = this.applied + text.slice(this.applied.length + character.length);
            throw error;
          }
        }
      })
      .catch((error) => this.showError(error))
      .finally(() => {
        this.pumping = false;
        if (!this.session.dead && this.normalise() !== this.applied) this.pump();
      });
  }

  renderKeys(candidates) {
    this.keys.dataset.step = String(this.session.stepCount); // the step these guesses follow
    this.keys.replaceChildren(
      ...candidates.map((c) => {
        const item = document.createElement("li");
        item.dataset.symbol = c.symbol;
        item.dataset.probability = String(c.probability);
        const name = document.createElement("span");
        name.className = "symbol";
        name.textContent = visible(c.symbol);
        const bar = document.createElement("span");
        bar.className = "bar";
        bar.style.setProperty("--p", String(c.probability));
        const value = document.createElement("span");
        value.className = "probability";
        value.textContent = c.probability.toFixed(4);
        item.append(name, bar, value);
        return item;
      }),
    );
  }

  generate() {
    const steps = Number.parseInt(this.steps.value, 10) || 20;
    const temperature = Number.parseFloat(this.temperature.value);
    this.input.readOnly = true;
    this.session
      .exclusive(async () => {
        const before = this.session.stepCount;
        const answer = await this.session.generate({
          steps,
          temperature: Number.isFinite(temperature) ? temperature : 1.0,
        });
        // A fresh session starts from the start symbol, which the server feeds first.
        const fed = answer.step_count - before - answer.generated.length;
        const start = fed === 1 && this.card.generation.start_symbol ? this.card.generation.start_symbol : "";
        this.applied += start + answer.generated.join("");
        this.input.value = this.applied;
        this.renderKeys([]);
        this.showError(null);
      })
      .catch((error) => this.showError(error))
      .finally(() => {
        this.input.readOnly = false;
      });
  }

  /** After a reset or on a new session: nothing typed yet. */
  clear() {
    this.applied = "";
    this.input.value = "";
    this.renderKeys([]);
  }
}
