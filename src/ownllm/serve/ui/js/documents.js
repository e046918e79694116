// Documents: add files to the server's store (indexed one by one, with progress), ask with numbered citations and
// the passages they point to. Retrieval first (POST /v1/rag/context), then the chat with "rag" streams the answer
// from the same sources; "I don't know." when nothing in the store is close enough.

import { clearError, getJSON, postForm, postJSON, postStream, showError } from "./api.js";

const $ = (id) => document.getElementById(id);

export function init() {
  $("doc-files").addEventListener("change", () => add([...$("doc-files").files]));
  $("ask-form").addEventListener("submit", (event) => {
    event.preventDefault();
    ask();
  });
}

export function enter() {
  clearError($("doc-error"));
  list();
}

async function list() {
  try {
    const { data } = await getJSON("/v1/rag/documents");
    $("doc-list").replaceChildren(...data.map((d) => {
      const li = document.createElement("li");
      li.textContent = d.filename;
      li.title = d.id;
      return li;
    }));
    if (!data.length) $("doc-list").innerHTML = "<li class=\"muted\">no documents yet</li>";
  } catch (err) {
    showError($("doc-error"), err);
  }
}

async function add(files) {
  clearError($("doc-error"));
  const bar = $("doc-progress-bar");
  bar.hidden = false;
  bar.max = files.length;
  const failed = [];
  for (const [index, file] of files.entries()) {
    bar.value = index;
    $("doc-progress").textContent = `indexing ${index + 1}/${files.length}: ${file.name}…`;
    const form = new FormData();
    form.append("file", file, file.name);
    try {
      const done = await postForm("/v1/rag/documents", form);
      $("doc-progress").textContent = `${file.name}: ${done.status}, ${done.chunks} chunks`;
    } catch (err) {
      failed.push(err.message);
      showError($("doc-error"), failed.join("\n")); // every file that failed, not only the last one
    }
  }
  bar.value = files.length;
  const indexed = files.length - failed.length;
  $("doc-progress").textContent = failed.length
    ? `indexed ${indexed} of ${files.length} file(s); ${failed.length} failed (see below)`
    : `indexed ${files.length} file(s)`;
  $("doc-files").value = "";
  list();
}

function cite(text, sources) {
  // "[2]" becomes a link to source 2's passage
  const answer = $("answer");
  answer.replaceChildren();
  let last = 0;
  for (const match of text.matchAll(/\[(\d+)\]/g)) {
    answer.append(text.slice(last, match.index));
    const n = Number(match[1]);
    if (n >= 1 && n <= sources.length) {
      const link = document.createElement("a");
      link.href = `#documents`;
      link.className = "citation";
      link.textContent = match[0];
      link.onclick = (event) => {
        event.preventDefault();
        document.getElementById(`source-${n}`).scrollIntoView({ block: "nearest" });
        document.getElementById(`source-${n}`).classList.add("flash");
      };
      answer.append(link);
    } else {
      answer.append(match[0]);
    }
    last = match.index + match[0].length;
  }
  answer.append(text.slice(last));
}

async function ask() {
  clearError($("doc-error"));
  const question = $("question").value.trim();
  const k = Number($("ask-k").value);
  const minScore = Number($("ask-min").value);
  $("answer-view").hidden = false;
  $("answer").className = "";
  $("answer").textContent = "…";
  $("sources").replaceChildren();
  $("cited").textContent = "";
  try {
    const context = await postJSON("/v1/rag/context", { question, k, min_score: minScore });
    if (context.abstain) {
      $("answer").textContent = "I don't know.";
      $("answer").className = "idk";
      const li = document.createElement("li");
      li.className = "muted";
      li.textContent = `Nothing in the documents is close enough to the question (best similarity ` +
        `${context.best_similarity.toFixed(2)}, below ${minScore}).`;
      $("sources").append(li);
      return;
    }
    $("sources").replaceChildren(...context.sources.map((s) => {
      const li = document.createElement("li");
      li.id = `source-${s.index}`;
      const head = document.createElement("strong");
      const where = [s.source.split("/").pop(), s.page ? `page ${s.page}` : "", s.heading ?? ""].filter(Boolean).join(" · ");
      head.textContent = `[${s.index}] ${where}`;
      const passage = document.createElement("blockquote");
      passage.textContent = s.text;
      li.append(head, passage);
      return li;
    }));
    const models = await getJSON("/v1/models");
    const model = models.data.find((m) => m.owned_by !== "sentence-transformers" && !m.task && !m.parent)?.id;
    let text = "";
    await postStream("/v1/chat/completions", {
      model, messages: [{ role: "user", content: question }], rag: { k, min_score: minScore }, stream: true,
      temperature: 0, max_tokens: Number($("ask-max").value) || 200,
    }, (chunk) => {
      for (const choice of chunk.choices || []) text += choice.delta?.content ?? "";
      $("answer").textContent = text;
    });
    cite(text.trim(), context.sources);
    if (text.trim() === "I don't know.") {
      $("answer").className = "idk";
    } else {
      // the numbered sources the answer was written from (small models seldom write the [n] themselves)
      const inline = [...text.matchAll(/\[(\d+)\]/g)].map((m) => Number(m[1]));
      $("cited").textContent = inline.length
        ? `Cites ${[...new Set(inline)].map((n) => `[${n}]`).join(" ")} of the sources below.`
        : `Answered from sources ${context.sources.map((s) => `[${s.index}]`).join(" ")} below.`;
    }
  } catch (err) {
    $("answer").textContent = "";
    showError($("doc-error"), err);
  }
}
