// A line chart on a canvas, drawn by hand: the inputs fed to a session, its one-step-ahead
// predictions and generated forecasts, against the session's step index.

const SERIES = {
  inputs: { color: "#2563eb", label: "input", dash: [] },
  predictions: { color: "#ea580c", label: "prediction (one step ahead)", dash: [] },
  forecast: { color: "#16a34a", label: "forecast (generated)", dash: [5, 4] },
};
const WINDOW = 240; // steps shown; older points are dropped
const PAD = { left: 44, right: 12, top: 26, bottom: 24 };

export class Chart {
  constructor(canvas) {
    this.canvas = canvas;
    this.clear();
    // Redraw at the new size when the page is resized (the canvas's CSS size is fixed by
    // the style sheet, so drawing does not resize it again).
    new ResizeObserver(() => this.draw()).observe(canvas);
  }

  clear() {
    this.points = { inputs: [], predictions: [], forecast: [] };
    this.segments = 0; // forecasts drawn, each a separate line
    this.draw();
  }

  /** Adds [step index, value] pairs to a series; forecast calls start a new segment. */
  add(series, pairs) {
    const segment = series === "forecast" ? ++this.segments : 0;
    for (const [index, value] of pairs) this.points[series].push({ index, value, segment });
    const last = Math.max(...Object.values(this.points).flatMap((p) => p.map((q) => q.index)));
    for (const name of Object.keys(this.points)) {
      this.points[name] = this.points[name].filter((p) => p.index > last - WINDOW);
    }
    this.draw();
  }

  /** The points as a table inside the canvas: what screen readers (and scripts) get. */
  describe() {
    const table = document.createElement("table");
    const caption = document.createElement("caption");
    caption.textContent = "Chart data: step index and value of each point";
    table.append(caption);
    for (const [name, style] of Object.entries(SERIES)) {
      for (const p of this.points[name]) {
        const row = document.createElement("tr");
        row.dataset.series = name;
        row.dataset.index = String(p.index);
        row.dataset.value = String(p.value);
        const cells = [style.label, String(p.index), String(p.value)].map((text) => {
          const cell = document.createElement("td");
          cell.textContent = text;
          return cell;
        });
        row.append(...cells);
        table.append(row);
      }
    }
    this.canvas.replaceChildren(table);
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 640;
    const height = canvas.clientHeight || 260;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    for (const name of Object.keys(SERIES)) canvas.dataset[name] = String(this.points[name].length);
    this.describe();

    const all = Object.values(this.points).flat();
    const maxIndex = all.length ? Math.max(...all.map((p) => p.index)) : WINDOW;
    const minIndex = Math.max(0, maxIndex - WINDOW + 1);
    const values = all.map((p) => p.value);
    let low = Math.min(-1, ...values);
    let high = Math.max(1, ...values);
    const margin = (high - low) * 0.05;
    low -= margin;
    high += margin;
    const x = (i) => PAD.left + ((i - minIndex) / Math.max(1, maxIndex - minIndex)) * (width - PAD.left - PAD.right);
    const y = (v) => PAD.top + ((high - v) / (high - low)) * (height - PAD.top - PAD.bottom);

    ctx.font = "11px system-ui, sans-serif";
    ctx.strokeStyle = "#d4d4d8";
    ctx.fillStyle = "#52525b";
    ctx.lineWidth = 1;
    for (const v of [low + margin, 0, high - margin]) {
      ctx.beginPath();
      ctx.moveTo(PAD.left, y(v));
      ctx.lineTo(width - PAD.right, y(v));
      ctx.stroke();
      ctx.fillText(v.toFixed(2), 4, y(v) + 4);
    }
    ctx.fillText(`step ${minIndex}`, PAD.left, height - 6);
    const endLabel = `step ${maxIndex}`;
    ctx.fillText(endLabel, width - PAD.right - ctx.measureText(endLabel).width, height - 6);

    let legendX = PAD.left;
    for (const [name, style] of Object.entries(SERIES)) {
      ctx.fillStyle = style.color;
      ctx.fillRect(legendX, 8, 14, 3);
      ctx.fillStyle = "#27272a";
      ctx.fillText(style.label, legendX + 18, 13);
      legendX += ctx.measureText(style.label).width + 36;
    }

    for (const [name, style] of Object.entries(SERIES)) {
      const points = this.points[name];
      ctx.strokeStyle = style.color;
      ctx.fillStyle = style.color;
      ctx.lineWidth = 1.5;
      ctx.setLineDash(style.dash);
      ctx.beginPath();
      points.forEach((p, k) => {
        const joined = k > 0 && points[k - 1].segment === p.segment && points[k - 1].index === p.index - 1;
        if (joined) ctx.lineTo(x(p.index), y(p.value));
        else ctx.moveTo(x(p.index), y(p.value));
      });
      ctx.stroke();
      ctx.setLineDash([]);
      for (const p of points) {
        ctx.beginPath();
        ctx.arc(x(p.index), y(p.value), 2, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
  }
}
