// Pages by URL hash (#playground, #data, #tuning, #tuning/JOB_ID, #documents), and the API key dialog.

import { apiKey, onKeyNeeded, setApiKey } from "./api.js";
import * as data from "./data.js";
import * as documents from "./documents.js";
import * as evaluate from "./evaluate.js";
import * as playground from "./playground.js";
import * as tuning from "./tuning.js";

const pages = { playground, data, tuning, evaluate, documents };
const $ = (id) => document.getElementById(id);

// One key prompt at a time: requests that get 401 meanwhile wait for the same answer.
let pending = null;
onKeyNeeded((error) => {
  if (!pending) {
    pending = new Promise((resolve) => {
      const dialog = $("key-dialog");
      $("key-error").textContent = apiKey() ? error.message : "";
      $("key-input").value = "";
      $("key-form").onsubmit = () => {
        setApiKey($("key-input").value.trim());
        $("forget-key").hidden = false;
        resolve(true);
      };
      dialog.oncancel = () => resolve(false);
      dialog.showModal();
    }).finally(() => {
      pending = null;
    });
  }
  return pending;
});

$("forget-key").hidden = !apiKey();
$("forget-key").onclick = () => {
  setApiKey("");
  $("forget-key").hidden = true;
  show();
};

let current = null;
function show() {
  const [name, ...rest] = (location.hash.slice(1) || "playground").split("/");
  const page = pages[name] ? name : "playground";
  for (const section of document.querySelectorAll(".page")) section.hidden = section.id !== `page-${page}`;
  for (const link of document.querySelectorAll("nav a")) {
    link.toggleAttribute("aria-current", link.dataset.page === page);
  }
  if (current && current !== pages[page] && current.leave) current.leave();
  current = pages[page];
  current.enter(rest.join("/"));
}

for (const page of Object.values(pages)) page.init();
window.addEventListener("hashchange", show);
fetch("/health")
  .then((r) => r.json())
  .then((h) => {
    $("server-info").textContent = `${h.model} · ${h.batching?.mode ?? ""}`;
  })
  .catch(() => {});
show();
