// Fine-tuning jobs (OpenAI's /v1/fine_tuning/jobs): create one from an uploaded file, list them, and follow one
// with its live loss curve (from its `metrics` events), events, checkpoints and cancel.

import { clearError, getJSON, postJSON, showError } from "./api.js";
import { lineChart } from "./charts.js";

const $ = (id) => document.getElementById(id);
const ACTIVE = new Set(["validating_files", "queued", "running"]);
let timer = null;
let shown = null; // the job id on the page

export function init() {
  $("job-form").addEventListener("submit", (event) => {
    event.preventDefault();
    create();
  });
  $("job-cancel").onclick = cancel;
}

export async function enter(jobId) {
  clearError($("job-form-error"));
  shown = jobId || null;
  $("job-view").hidden = !shown;
  try {
    const health = await fetch("/health").then((r) => r.json());
    $("job-model").value = health.model;
    const { data } = await getJSON("/v1/files?purpose=fine-tune");
    const select = $("job-file");
    const wanted = sessionStorage.getItem("ownllm.trainingFile") || select.value;
    select.replaceChildren(...data.map((f) => new Option(`${f.filename} (${f.id})`, f.id)));
    if (data.some((f) => f.id === wanted)) select.value = wanted;
  } catch (err) {
    showError($("job-form-error"), err);
  }
  refresh();
}

export function leave() {
  clearTimeout(timer);
  timer = null;
}

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

async function create() {
  clearError($("job-form-error"));
  const hyperparameters = Object.fromEntries(Object.entries({
    n_epochs: number("job-epochs"),
    learning_rate_multiplier: number("job-lr"),
    batch_size: number("job-batch"),
    max_steps: number("job-steps"),
  }).filter(([, v]) => v !== undefined));
  const type = $("job-method").value;
  const body = { model: $("job-model").value, training_file: $("job-file").value,
                 method: { type, [type]: { hyperparameters } } };
  if ($("job-suffix").value.trim()) body.suffix = $("job-suffix").value.trim();
  if (!body.training_file) {
    showError($("job-form-error"), "Upload a training file first (Data page).");
    return;
  }
  try {
    const job = await postJSON("/v1/fine_tuning/jobs", body);
    location.hash = `#tuning/${job.id}`;
  } catch (err) {
    showError($("job-form-error"), err);
  }
}

async function cancel() {
  try {
    await postJSON(`/v1/fine_tuning/jobs/${encodeURIComponent(shown)}/cancel`, {});
    refresh();
  } catch (err) {
    showError($("job-error"), err);
  }
}

function cells(values) {
  const tr = document.createElement("tr");
  for (const value of values) {
    const td = document.createElement("td");
    if (value instanceof Node) td.append(value);
    else td.textContent = value ?? "";
    tr.append(td);
  }
  return tr;
}

async function refresh() {
  clearTimeout(timer);
  let active = false;
  try {
    const { data } = await getJSON("/v1/fine_tuning/jobs?limit=100");
    $("jobs-table").tBodies[0].replaceChildren(...data.map((job) => {
      const link = document.createElement("a");
      link.href = `#tuning/${job.id}`;
      link.textContent = job.id;
      const status = document.createElement("span");
      status.className = `status ${job.status}`;
      status.textContent = job.status;
      return cells([link, status, job.fine_tuned_model ?? job.model, new Date(job.created_at * 1000).toLocaleString()]);
    }));
    active = data.some((job) => ACTIVE.has(job.status));
    if (shown) active = (await showJob(shown)) || active;
  } catch (err) {
    showError(shown ? $("job-error") : $("job-form-error"), err);
  }
  // poll while something trains and this page is open
  if (active && location.hash.startsWith("#tuning")) timer = setTimeout(refresh, 1500);
}

async function showJob(id) {
  // the id comes from the address bar: encoded, so a crafted link cannot point the page's calls at another path
  const path = `/v1/fine_tuning/jobs/${encodeURIComponent(id)}`;
  const job = await getJSON(path);
  const [events, checkpoints] = await Promise.all([
    getJSON(`${path}/events?limit=1000`),
    getJSON(`${path}/checkpoints?limit=100`),
  ]);
  $("job-title").textContent = `Job ${job.id}`;
  $("job-status").textContent = job.status;
  $("job-status").className = `status ${job.status}`;
  $("job-cancel").hidden = !ACTIVE.has(job.status);
  const out = $("job-model-out");
  out.replaceChildren();
  if (job.fine_tuned_model) {
    out.append(`model ${job.fine_tuned_model} `);
    if (job.status === "succeeded") {
      const link = document.createElement("a");
      link.href = "#playground";
      link.textContent = "try it in the playground →";
      out.append(link);
    }
  }
  $("job-error").textContent = job.error ? `${job.error.code ?? "error"}: ${job.error.message}` : "";
  const ordered = [...events.data].reverse(); // the API lists newest first
  const train = [];
  const valid = [];
  for (const event of ordered) {
    if (event.type !== "metrics") continue;
    if (event.data.train_loss !== undefined) train.push([event.data.step, event.data.train_loss]);
    if (event.data.valid_loss !== undefined) valid.push([event.data.step, event.data.valid_loss]);
  }
  lineChart($("loss-chart"), [
    { name: "training loss", points: train, className: "train" },
    { name: "validation loss", points: valid, className: "valid" },
  ], { empty: ACTIVE.has(job.status) ? "waiting for the first logged step…" : "no loss was logged" });
  $("job-events").replaceChildren(...ordered.map((event) => {
    const li = document.createElement("li");
    li.className = event.level;
    li.textContent = `${new Date(event.created_at * 1000).toLocaleTimeString()}  ${event.message}`;
    return li;
  }));
  $("job-checkpoints").tBodies[0].replaceChildren(...checkpoints.data.map((c) =>
    cells([c.step_number, c.metrics.train_loss, c.metrics.valid_loss, c.fine_tuned_model_checkpoint])));
  return ACTIVE.has(job.status);
}
