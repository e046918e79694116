// Drop a training file: the data doctor's report (POST /v1/data/check), then upload it (POST /v1/files).

import { clearError, getJSON, postForm, showError } from "./api.js";
import { barChart } from "./charts.js";

const $ = (id) => document.getElementById(id);
let checked = null; // the File last checked

export function init() {
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) check(event.dataTransfer.files[0]);
  });
  $("data-file").addEventListener("change", () => {
    if ($("data-file").files.length) check($("data-file").files[0]);
  });
  $("upload-training").onclick = upload;
}

export function enter() {
  listFiles();
}

async function listFiles() {
  try {
    const { data } = await getJSON("/v1/files?purpose=fine-tune");
    $("files-table").tBodies[0].replaceChildren(...data.map((f) => row([f.id, f.filename, f.bytes,
      new Date(f.created_at * 1000).toLocaleString()])));
  } catch (err) {
    showError($("data-error"), err);
  }
}

function row(values) {
  const tr = document.createElement("tr");
  for (const value of values) {
    const td = document.createElement("td");
    td.textContent = value;
    tr.append(td);
  }
  return tr;
}

function item(text, className) {
  const li = document.createElement("li");
  li.textContent = text;
  if (className) li.className = className;
  return li;
}

async function check(file) {
  clearError($("data-error"));
  $("upload-result").textContent = "";
  $("data-report").hidden = true;
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("estimate", $("data-estimate").checked ? "true" : "false");
  $("data-title").textContent = "";
  try {
    const report = await postForm("/v1/data/check", form);
    checked = file;
    render(report);
  } catch (err) {
    showError($("data-error"), err);
  }
}

function render(report) {
  $("data-report").hidden = false;
  $("data-title").textContent = report.file;
  const tokens = report.tokens || {};
  const summary = {
    format: report.format ?? "unknown",
    "usable examples": report.examples,
    "unusable lines": report.problems.length,
    "tokens min / mean / p95 / max": tokens.min === undefined ? "-" : `${tokens.min} / ${tokens.mean} / ${tokens.p95} / ${tokens.max}`,
    "tokens per epoch": tokens.total_per_epoch ?? "-",
    [`longer than ${report.max_length}`]: report.too_long.length,
  };
  if (report.estimated_seconds_per_epoch !== null) {
    summary["training time per epoch (estimated)"] =
      `${Math.round(report.estimated_seconds_per_epoch)} s at ${report.measured_tokens_per_second} tokens/s`;
  }
  $("data-summary").replaceChildren(...Object.entries(summary).flatMap(([k, v]) => {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    return [dt, dd];
  }));
  $("problem-count").textContent = report.problems.length;
  $("data-problems").replaceChildren(...report.problem_lines.map((p) => {
    const li = document.createElement("li");
    if (p.line !== null) {
      const badge = document.createElement("span");
      badge.className = "line";
      badge.textContent = `line ${p.line}`;
      li.append(badge, " ");
      li.dataset.line = p.line;
    }
    li.append(p.message);
    return li;
  }));
  if (!report.problems.length) $("data-problems").append(item("none", "ok"));
  $("data-warnings").replaceChildren(...(report.warnings.length ? report.warnings.map((w) => item(w, "warn")) : [item("none", "ok")]));
  const duplicates = [
    ...report.exact_duplicates.map(([line, first]) => `line ${line} repeats line ${first} exactly`),
    ...report.near_duplicates.map(([line, first]) => `line ${line} nearly repeats line ${first}`),
  ];
  $("data-duplicates").replaceChildren(...(duplicates.length ? duplicates.map((d) => item(d, "warn")) : [item("none", "ok")]));
  barChart($("data-histogram"), report.histogram.edges, report.histogram.counts);
  $("upload-training").disabled = report.examples === 0;
}

async function upload() {
  if (!checked) return;
  clearError($("data-error"));
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", checked, checked.name);
  try {
    const file = await postForm("/v1/files", form);
    $("upload-result").textContent = `Uploaded as ${file.id}. `;
    const link = document.createElement("a");
    link.href = `#tuning`;
    link.textContent = "Fine-tune with it →";
    link.onclick = () => sessionStorage.setItem("ownllm.trainingFile", file.id);
    $("upload-result").append(link);
    listFiles();
  } catch (err) {
    showError($("data-error"), err);
  }
}
