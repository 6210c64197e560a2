// The model list: every model of GET /v1/models with the facts of its cards, and the
// error of a version that failed to load.

import { request } from "./api.js";

export async function loadModels() {
  const answer = await request("GET", "v1/models");
  return answer.models;
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function number(value) {
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return String(value);
  return Math.abs(value) >= 1e-3 ? value.toPrecision(4).replace(/\.?0+$/, "") : value.toExponential(2);
}

/** [name, value] pairs of a metrics object, nested objects named ``outer.inner``. */
function flatten(metrics, prefix = "") {
  return Object.entries(metrics).flatMap(([name, value]) =>
    value && typeof value === "object" && !Array.isArray(value)
      ? flatten(value, `${prefix}${name}.`)
      : [[`${prefix}${name}`, value]],
  );
}

function facts(card) {
  const rows = [];
  const layers = card.layers
    ? card.layers.map((layer) => `${layer.cell} ${layer.hidden_size}`).join(" → ")
    : `${card.num_layers} × ${card.hidden_size}`;
  rows.push(["cell", card.cell]);
  rows.push(["layers", layers]);
  const tokens = card.inputs && card.inputs.kind === "tokens";
  rows.push(["sizes", `${tokens ? "tokens of " : ""}${card.input_size} in → ${card.output_size} out (${card.output_activation})`]);
  if (card.task) rows.push(["task", card.task]);
  if (card.vocabulary) {
    const shown = card.vocabulary.length <= 24 ? card.vocabulary.join(" ") : `${card.vocabulary.length} symbols`;
    rows.push(["vocabulary", shown]);
  }
  if (card.generation) rows.push(["generation", card.generation.mode]);
  const metrics = flatten(card.metrics || {}).filter(([, v]) => typeof v === "number");
  if (metrics.length) rows.push(["metrics", metrics.map(([k, v]) => `${k} ${number(v)}`).join(", ")]);
  return rows;
}

/** Fills ``list`` with one entry per model; ``choose(model, version, card)`` on a click. */
export function renderModels(list, models, choose) {
  list.replaceChildren();
  for (const model of models) {
    const entry = element("li", { "data-testid": `model-${model.name}`, class: "model" });
    entry.append(element("h3", { text: model.name }));
    for (const version of model.versions) {
      const isDefault = version.version === model.default_version;
      const block = element("div", { class: version.ready ? "version" : "version bad" });
      const title = element("div", { class: "version-title" });
      if (version.ready && version.card) {
        const button = element("button", {
          type: "button",
          "data-testid": `model-${model.name}-v${version.version}`,
          text: `Open v${version.version}${isDefault ? " (default)" : ""}`,
        });
        button.addEventListener("click", () => choose(model.name, version.version, version.card));
        title.append(button);
      } else {
        title.append(element("span", { class: "badge", text: `v${version.version} failed to load` }));
      }
      block.append(title);
      if (version.error) block.append(element("p", { class: "model-error", text: version.error }));
      if (version.card) {
        const table = element("dl", { class: "facts" });
        for (const [name, value] of facts(version.card)) {
          table.append(element("dt", { text: name }), element("dd", { text: value }));
        }
        block.append(table);
      }
      entry.append(block);
    }
    const preferred = model.versions.find((v) => v.version === model.default_version && v.ready && v.card);
    if (preferred) {
      entry.classList.add("ready");
      entry.addEventListener("click", (event) => {
        if (!event.target.closest("button")) choose(model.name, preferred.version, preferred.card);
      });
    }
    list.append(entry);
  }
}
