// Symbol and token models: what is typed is cut into units (one character per symbol, or
// space-separated ids and symbols), each unit is one step of the session over the
// WebSocket, and the model's five most probable next symbols are shown after every answer.

const TOP = 5;

/** Whether a card is driven by typing: it has a vocabulary or takes token ids. */
export function typeable(card) {
  return Boolean(card.vocabulary && card.vocabulary.length) || (card.inputs && card.inputs.kind === "tokens");
}

/** One character per step when every symbol is one character, else space-separated words. */
function unitsOf(card) {
  const vocabulary = card.vocabulary || [];
  return vocabulary.length > 0 && vocabulary.every((s) => [...s].length === 1) ? CHARACTERS : WORDS;
}

const CHARACTERS = {
  split: (text) => ({ units: [...text], tail: "" }),
  join: (units) => units.join(""),
  input: (unit) => unit,
};

const WORDS = {
  // A word is complete once a space (or newline) follows it; the last one may be unfinished.
  split(text) {
    const words = text.split(/\s+/);
    const tail = /\s$/.test(text) ? "" : words.pop();
    return { units: words.filter((w) => w !== ""), tail };
  },
  join: (units) => units.map((u) => `${u} `).join(""),
  input: (unit) => (/^\d+$/.test(unit) ? Number(unit) : unit), // an id, else a symbol
};

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
    this.units = unitsOf(this.card);
    this.applied = []; // the units the session has consumed since it was opened or reset
    this.pumping = false;
    this.symbols = new Set(this.card.vocabulary || []);
    root.replaceChildren(this.build());
    session.onChange(() => this.enableGenerate());
    this.enableGenerate();
  }

  /** Generation starts from the start symbol or from the model's last answer. */
  enableGenerate() {
    const generation = this.card.generation;
    const startable = generation && (generation.start_symbol || this.session.stepCount > 0);
    this.generateButton.disabled = !startable || this.input.readOnly;
  }

  build() {
    const template = document.getElementById("symbol-panel");
    const panel = template.content.cloneNode(true);
    this.input = panel.querySelector('[data-testid="type-input"]');
    this.keys = panel.querySelector('[data-testid="next-keys"]');
    this.generateButton = panel.querySelector('[data-testid="generate"]');
    this.steps = panel.querySelector('[data-testid="generate-steps"]');
    this.temperature = panel.querySelector('[data-testid="generate-temperature"]');
    const vocabulary = this.card.vocabulary;
    panel.querySelector(".typing-hint").textContent =
      this.units === CHARACTERS
        ? `Vocabulary: ${vocabulary.map(visible).join(" ")}. Each key is one step.`
        : `Token ids 0 to ${this.card.input_size - 1}${vocabulary ? " or symbols" : ""}, ` +
          "separated by spaces: each one is a step once a space follows it.";
    this.input.addEventListener("input", () => this.pump());
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

  /** The text box cut into units (characters mapped onto the vocabulary's case). */
  wanted() {
    if (this.units === CHARACTERS) {
      const text = [...this.input.value].map((c) => this.symbolOf(c)).join("");
      if (text !== this.input.value) this.input.value = text;
    }
    return this.units.split(this.input.value);
  }

  level() {
    const { units } = this.wanted();
    return units.length === this.applied.length && units.every((u, i) => u === this.applied[i]);
  }

  /** Brings the session level with the text box, one step (one message) per unit. */
  pump() {
    if (this.pumping) return;
    this.pumping = true;
    this.session
      .exclusive(async () => {
        for (;;) {
          const { units, tail } = this.wanted();
          const n = this.applied.length;
          if (!this.applied.every((u, i) => u === units[i])) {
            // An edit before the end: the state cannot step back, so start over and
            // feed the text again.
            await this.session.reset();
            this.applied = [];
            this.renderKeys([]);
            continue;
          }
          if (units.length === n) return;
          const unit = units[n];
          try {
            const answer = await this.session.step([this.units.input(unit)], askTopK(this.card));
            this.applied.push(unit);
            this.renderKeys(candidatesOf(this.card, answer));
            this.showError(null);
          } catch (error) {
            // Refused (e.g. an unknown symbol): the state is untouched, so drop the unit.
            this.input.value = this.units.join([...this.applied, ...units.slice(n + 1)]) + tail;
            throw error;
          }
        }
      })
      .catch((error) => this.showError(error))
      .finally(() => {
        this.pumping = false;
        if (!this.session.dead && !this.level()) this.pump();
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
    this.generateButton.disabled = true;
    this.session
      .exclusive(async () => {
        const before = this.session.stepCount;
        const answer = await this.session.generate({
          steps,
          temperature: Number.isFinite(temperature) ? temperature : 1.0,
        });
        // A fresh session starts from the start symbol, which the server feeds first.
        const fed = answer.step_count - before - answer.generated.length;
        const start = fed === 1 && this.card.generation.start_symbol ? [this.card.generation.start_symbol] : [];
        this.applied.push(...start, ...answer.generated.map(String));
        this.input.value = this.units.join(this.applied);
        this.renderKeys([]);
        this.showError(null);
      })
      .catch((error) => this.showError(error))
      .finally(() => {
        this.input.readOnly = false;
        this.enableGenerate();
      });
  }

  /** After a reset or on a new session: nothing typed yet. */
  clear() {
    this.applied = [];
    this.input.value = "";
    this.renderKeys([]);
  }
}
