// Chat with streaming, decoding controls, token counts and speed; one or two models side by side; click a token
// for its probability table (POST /v1/explain: the same request decoded with the sampler's explanation on).

import { clearError, getJSON, postJSON, postStream, showError } from "./api.js";

const $ = (id) => document.getElementById(id);
let columns = [];
let running = null; // AbortController of the generation in flight

export function init() {
  $("prompt-form").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("prompt-form").requestSubmit();
  });
  $("stop-generation").onclick = () => running?.abort();
  $("reset").onclick = () => layout(true);
  $("model").onchange = () => layout(true);
  $("model-b").onchange = () => layout(true);
  $("strategy").onchange = () => {
    for (const id of ["temperature", "top-k", "top-p", "min-p"]) $(id).disabled = $("strategy").value === "greedy";
  };
}

export async function enter() {
  clearError($("playground-error"));
  try {
    const { data } = await getJSON("/v1/models");
    const models = data.filter((m) => m.owned_by !== "sentence-transformers" && !m.task).map((m) => m.id);
    fill($("model"), models, false);
    fill($("model-b"), models, true);
  } catch (err) {
    showError($("playground-error"), err);
  }
  if (!columns.length) layout(true);
}

function fill(select, models, optional) {
  const chosen = select.value;
  select.replaceChildren();
  if (optional) select.append(new Option("— none —", ""));
  for (const id of models) select.append(new Option(id, id));
  if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
}

// One column per model; a new model choice starts new conversations.
function layout(reset) {
  if (!reset) return;
  const models = [$("model").value, $("model-b").value].filter(Boolean);
  columns = models.map((model) => ({ model, history: [], element: null }));
  const holder = $("columns");
  holder.replaceChildren();
  holder.classList.toggle("side-by-side", columns.length > 1);
  for (const column of columns) {
    const section = document.createElement("section");
    section.className = "column";
    section.dataset.model = column.model;
    section.innerHTML = `<h3></h3><div class="messages" aria-live="polite"></div><p class="stats muted"></p>`;
    section.querySelector("h3").textContent = column.model;
    holder.append(section);
    column.element = section;
  }
  $("token-panel").hidden = true;
}

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

// The decoding controls as request fields (OpenAI's names; top_k, min_p and repetition_penalty are extensions, as
// in vLLM).
function decoding() {
  const greedy = $("strategy").value === "greedy";
  const fields = {
    temperature: greedy ? 0 : number("temperature"),
    top_p: greedy ? null : number("top-p"),
    top_k: greedy ? null : number("top-k"),
    min_p: greedy ? null : number("min-p"),
    repetition_penalty: number("repetition-penalty"),
    max_tokens: number("max-tokens"),
    seed: number("seed"),
  };
  const stop = $("stop").value.split("\n").filter((s) => s !== "");
  if (stop.length) fields.stop = stop;
  // a seed is always sent while sampling, so the explained run draws the same tokens as the streamed one
  if (!greedy && fields.seed === null) fields.seed = Math.floor(Math.random() * 2 ** 31);
  return Object.fromEntries(Object.entries(fields).filter(([, v]) => v !== null && !Number.isNaN(v)));
}

function messagesFor(column, prompt) {
  const system = $("system").value.trim();
  return [...(system ? [{ role: "system", content: system }] : []), ...column.history, { role: "user", content: prompt }];
}

function addMessage(column, role, text) {
  const message = document.createElement("div");
  message.className = `message ${role}`;
  const body = document.createElement("div");
  body.className = "content";
  body.textContent = text;
  message.append(body);
  column.element.querySelector(".messages").append(message);
  return body;
}

async function send() {
  const prompt = $("prompt").value.trim();
  if (!prompt || running) return;
  if (!columns.length) layout(true);
  clearError($("playground-error"));
  if (!columns.length) {
    showError($("playground-error"), "No model to ask: the list of models could not be loaded (reload the page).");
    return;
  }
  const controls = decoding();
  running = new AbortController();
  $("send").disabled = true;
  $("stop-generation").disabled = false;
  $("prompt").value = "";
  try {
    // the two columns one after the other: on a small CPU each then gets the whole machine
    for (const column of columns) {
      const body = { model: column.model, messages: messagesFor(column, prompt), ...controls, stream: true,
                     stream_options: { include_usage: true } };
      $("last-request").textContent = JSON.stringify(body, null, 2);
      addMessage(column, "user", prompt);
      const reply = await stream(column, body, running.signal);
      column.history.push({ role: "user", content: prompt }, { role: "assistant", content: reply.text });
      clickable(column, body, reply.content);
    }
  } catch (err) {
    if (err.name !== "AbortError") showError($("playground-error"), err);
  } finally {
    running = null;
    $("send").disabled = false;
    $("stop-generation").disabled = true;
  }
}

async function stream(column, body, signal) {
  const content = addMessage(column, "assistant", "");
  content.classList.add("streaming");
  const started = performance.now();
  let first = null;
  let last = null;
  let usage = null;
  let text = "";
  let pieces = 0;
  try {
    await postStream("/v1/chat/completions", body, (chunk) => {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = choice.delta?.content;
        if (!piece) continue;
        last = performance.now();
        first ??= last;
        text += piece;
        pieces += 1;
        const span = document.createElement("span");
        span.className = "tok";
        span.textContent = piece;
        content.append(span);
      }
    }, signal);
  } catch (err) {
    // the turn failed: say so in the conversation too (the message itself is in the error line)
    const note = document.createElement("em");
    note.className = "failed";
    note.textContent = err.name === "AbortError" ? " (stopped)" : " (no reply: see the error below)";
    content.append(note);
    throw err;
  } finally {
    content.classList.remove("streaming");
  }
  const tokens = usage?.completion_tokens ?? pieces;
  const rate = tokens > 1 && last > first ? ((tokens - 1) * 1000) / (last - first) : 0;
  column.element.querySelector(".stats").textContent =
    `prompt ${usage?.prompt_tokens ?? "?"} tokens · completion ${tokens} tokens · ${rate.toFixed(1)} tok/s · ` +
    `first token after ${first ? Math.round(first - started) : "-"} ms` + (body.seed !== undefined ? ` · seed ${body.seed}` : "");
  content.dataset.text = text;
  return { text, content };
}

// A reply's tokens explain themselves when clicked: the first click decodes the same request again with the
// sampler's explanation on (POST /v1/explain), the reply becomes its explained tokens, and the clicked one's table
// is shown. Nothing is decoded twice unless somebody asks.
function clickable(column, body, content) {
  content.classList.add("clickable");
  content.title = "click a token for its probability table";
  content.onclick = async (event) => {
    const span = event.target.closest(".tok");
    if (!span || span.classList.contains("explained") || content.classList.contains("explaining")) return;
    let offset = 0;
    for (const piece of content.querySelectorAll(".tok")) {
      if (piece === span) break;
      offset += piece.textContent.length;
    }
    content.classList.add("explaining");
    clearError($("playground-error"));
    try {
      await explain(column, body, content);
      tokenAt(content, offset)?.click();
    } catch (err) {
      showError($("playground-error"), err);
    } finally {
      content.classList.remove("explaining");
    }
  };
}

function tokenAt(content, offset) {
  let end = 0;
  for (const token of content.querySelectorAll(".tok.explained")) {
    end += token.textContent.length;
    if (end > offset) return token;
  }
  return content.querySelector(".tok.explained:last-of-type");
}

async function explain(column, body, content) {
  const request = { ...body, stream: false, top: 10 };
  delete request.stream_options;
  const result = await postJSON("/v1/explain", request);
  const streamed = content.dataset.text;
  content.replaceChildren();
  result.tokens.forEach((token) => {
    const span = document.createElement("button");
    span.type = "button";
    span.className = "tok explained";
    span.textContent = token.text;
    span.title = `token ${token.index}: id ${token.id}`;
    span.onclick = () => showToken(column, token, result, span);
    content.append(span);
  });
  if (result.text.trim() !== streamed.trim()) {
    const note = document.createElement("p");
    note.className = "muted";
    note.textContent = "(decoded again, the reply came out differently — a near-tie turned the other way; the tokens " +
      "above are the explained run's)";
    content.after(note);
  }
}

function fmt(p) {
  return p >= 0.0001 || p === 0 ? p.toFixed(4) : p.toExponential(1);
}

function showToken(column, token, result, span) {
  for (const other of document.querySelectorAll(".tok.selected")) other.classList.remove("selected");
  span.classList.add("selected");
  const panel = $("token-panel");
  panel.hidden = false;
  $("token-title").textContent = `${column.model}: token ${token.index} ${JSON.stringify(token.text)}`;
  $("token-summary").textContent =
    `${result.strategy}, temperature ${result.temperature}, top-k ${result.top_k || "off"} (kept ${token.kept_top_k}), ` +
    `top-p ${result.top_p} (kept ${token.kept_top_p}), min-p ${result.min_p || "off"} (kept ${token.kept_min_p})`;
  $("token-temp-head").textContent = `p (T=${result.temperature})`;
  const rows = token.candidates.map((c) => {
    const row = document.createElement("tr");
    if (c.chosen) row.className = "chosen";
    for (const value of [JSON.stringify(c.token), c.id, fmt(c.p), fmt(c.p_temperature), fmt(c.p_top_k), fmt(c.p_top_p),
      fmt(c.p_min_p), c.chosen ? "← chosen" : ""]) {
      const cell = document.createElement("td");
      cell.textContent = value;
      row.append(cell);
    }
    row.dataset.p = c.p;
    row.dataset.pTopP = c.p_top_p;
    return row;
  });
  $("token-table").tBodies[0].replaceChildren(...rows);
}
