// Two models on a question file (POST /v1/evaluations/compare): metrics with deltas, a chart, and the items that
// improved and worsened most, both answers side by side.

import { clearError, getJSON, postForm, showError } from "./api.js";
import { groupedBars } from "./charts.js";

const $ = (id) => document.getElementById(id);
const METRICS = ["exact_match", "f1", "rouge_l", "contains"];

export function init() {
  $("eval-form").addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
}

export async function enter() {
  clearError($("eval-error"));
  try {
    const { data } = await getJSON("/v1/models");
    const models = data.filter((m) => m.owned_by !== "sentence-transformers" && !m.task).map((m) => m.id);
    for (const [id, index] of [["eval-a", 0], ["eval-b", models.length - 1]]) {
      const select = $(id);
      const chosen = select.value;
      select.replaceChildren(...models.map((m) => new Option(m, m)));
      select.value = models.includes(chosen) ? chosen : models[index];
    }
  } catch (err) {
    showError($("eval-error"), err);
  }
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.append(td);
}

function item(entry, a, b) {
  const li = document.createElement("li");
  const head = document.createElement("p");
  head.textContent = `line ${entry.line}: ${entry.question} (reference: ${entry.answers.join(" | ")}; ` +
    `F1 ${entry.a_scores.f1.toFixed(2)} → ${entry.b_scores.f1.toFixed(2)})`;
  const pair = document.createElement("div");
  pair.className = "pair";
  for (const [model, text] of [[a, entry.a], [b, entry.b]]) {
    const box = document.createElement("div");
    box.textContent = `${model}: ${text}`;
    pair.append(box);
  }
  li.append(head, pair);
  return li;
}

async function run() {
  clearError($("eval-error"));
  const file = $("eval-file").files[0];
  const a = $("eval-a").value;
  const b = $("eval-b").value;
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("model_a", a);
  form.append("model_b", b);
  form.append("max_tokens", $("eval-max").value || "64");
  $("eval-run").disabled = true;
  $("eval-progress").textContent = `answering with ${a} and ${b}…`;
  try {
    const report = await postForm("/v1/evaluations/compare", form);
    $("eval-report").hidden = false;
    $("eval-title").textContent = `${file.name}: ${report.items_count} questions`;
    $("eval-head-a").textContent = `A: ${a}`;
    $("eval-head-b").textContent = `B: ${b}`;
    $("eval-metrics").tBodies[0].replaceChildren(...METRICS.map((name) => {
      const row = document.createElement("tr");
      const delta = report.metrics.delta[name];
      cell(row, name);
      cell(row, report.metrics.a[name].toFixed(3));
      cell(row, report.metrics.b[name].toFixed(3));
      cell(row, `${delta > 0 ? "+" : ""}${delta.toFixed(3)}`, delta > 0 ? "delta-up" : delta < 0 ? "delta-down" : "");
      return row;
    }));
    groupedBars($("eval-chart"), METRICS, [
      { name: `A: ${a}`, values: METRICS.map((m) => report.metrics.a[m]), className: "a" },
      { name: `B: ${b}`, values: METRICS.map((m) => report.metrics.b[m]), className: "b" },
    ]);
    const ordered = [...report.items].sort((x, y) => y.delta_f1 - x.delta_f1);
    const improved = ordered.filter((x) => x.delta_f1 > 0).slice(0, 5);
    const worsened = ordered.filter((x) => x.delta_f1 < 0).reverse().slice(0, 5);
    $("eval-improved").replaceChildren(...improved.map((x) => item(x, a, b)));
    $("eval-worsened").replaceChildren(...worsened.map((x) => item(x, a, b)));
    if (!improved.length) $("eval-improved").innerHTML = "<li class=\"muted\">none</li>";
    if (!worsened.length) $("eval-worsened").innerHTML = "<li class=\"muted\">none</li>";
    $("eval-progress").textContent = "";
  } catch (err) {
    $("eval-progress").textContent = "";
    showError($("eval-error"), err);
  } finally {
    $("eval-run").disabled = false;
  }
}
