// Value models: a built-in noisy sine streamed one step per message, drawn with the
// model's one-step-ahead predictions, and forecasts generated from the session's state.

import { Chart } from "./chart.js";

const STEP_INTERVAL_MS = 60;

/** A reproducible noisy signal: two sines plus Gaussian noise (like the sine demo's data). */
export class NoisySine {
  constructor(seed = 1) {
    this.seed = seed;
    this.reset();
  }

  reset() {
    this.t = 0;
    this.state = this.seed >>> 0;
  }

  uniform() {
    // mulberry32
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let z = this.state;
    z = Math.imul(z ^ (z >>> 15), z | 1);
    z ^= z + Math.imul(z ^ (z >>> 7), z | 61);
    return ((z ^ (z >>> 14)) >>> 0) / 4294967296;
  }

  next() {
    const t = this.t++;
    const clean = 0.45 * Math.sin((2 * Math.PI * t) / 23) + 0.3 * Math.sin((2 * Math.PI * t) / 11 + 1);
    const gauss = Math.sqrt(-2 * Math.log(1 - this.uniform())) * Math.cos(2 * Math.PI * this.uniform());
    return clean + 0.05 * gauss;
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export class ValuePanel {
  constructor(root, session, showError) {
    this.session = session;
    this.card = session.card;
    this.showError = showError;
    this.signal = new NoisySine();
    this.streaming = false;
    this.run = 0; // bumped by stop(): a loop runs while its number is current
    root.replaceChildren(this.build());
    this.chart = new Chart(this.canvas);
    session.onChange(() => this.enableForecast());
    this.enableForecast();
  }

  /** Generation continues from the model's last answer: there is none before a step. */
  enableForecast() {
    const canForecast = this.card.generation && this.card.generation.mode === "value";
    this.forecastButton.disabled = !canForecast || this.session.stepCount === 0;
  }

  build() {
    const panel = document.getElementById("value-panel").content.cloneNode(true);
    this.canvas = panel.querySelector('[data-testid="chart"]');
    this.startButton = panel.querySelector('[data-testid="stream-start"]');
    this.stopButton = panel.querySelector('[data-testid="stream-stop"]');
    this.forecastButton = panel.querySelector('[data-testid="forecast"]');
    this.forecastSteps = panel.querySelector('[data-testid="forecast-steps"]');
    this.startButton.addEventListener("click", () => this.start());
    this.stopButton.addEventListener("click", () => this.stop());
    this.forecastButton.addEventListener("click", () => this.forecast());
    const canForecast = this.card.generation && this.card.generation.mode === "value";
    this.forecastSteps.disabled = !canForecast;
    panel.querySelector(".forecast-note").textContent = canForecast
      ? "Forecasting continues from the last answer: stream first."
      : "This model's card has no value generation.";
    this.stopButton.disabled = true;
    return panel;
  }

  async start() {
    if (this.streaming) return;
    this.streaming = true;
    const run = ++this.run;
    this.startButton.disabled = true;
    this.stopButton.disabled = false;
    try {
      while (this.run === run && !this.session.dead) {
        await this.session.exclusive(() => (this.run === run ? this.stepOnce() : undefined));
        await sleep(STEP_INTERVAL_MS);
      }
    } catch (error) {
      this.showError(error);
    } finally {
      if (this.run === run) this.stop();
    }
  }

  stop() {
    this.run += 1;
    this.streaming = false;
    this.startButton.disabled = false;
    this.stopButton.disabled = true;
  }

  async stepOnce() {
    const index = this.session.stepCount;
    const value = this.signal.next();
    const answer = await this.session.step([new Array(this.card.input_size).fill(value)]);
    this.chart.add("inputs", [[index, value]]);
    this.chart.add("predictions", [[index + 1, answer.outputs[0][0]]]);
    this.showError(null);
  }

  forecast() {
    const steps = Number.parseInt(this.forecastSteps.value, 10) || 20;
    this.session
      .exclusive(async () => {
        const before = this.session.stepCount;
        const answer = await this.session.generate({ steps });
        // Each generated value is fed back as the input of the next step.
        this.chart.add("forecast", answer.generated.map((row, k) => [before + k, row[0]]));
        this.showError(null);
      })
      .catch((error) => this.showError(error));
  }

  /** After a reset or on a new session: an empty chart and the signal from its start. */
  clear() {
    this.signal.reset();
    this.chart.clear();
  }

  dispose() {
    this.stop();
  }
}
