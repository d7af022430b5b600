// loraplex console: the models table (GET /v1/adapters), admin load and unload, and a side-by-side
// compare that streams one prompt to several models at once. Plain ES module, no build step.
// The API key lives only in this tab's sessionStorage and is sent as a bearer token on every call.

const KEY_STORAGE = "loraplex.apiKey";
const REFRESH_MS = 5000;

const $ = (selector) => document.querySelector(selector);

const state = {
  key: sessionStorage.getItem(KEY_STORAGE) ?? "",
  role: null, // "admin" or "user" once the server has answered
  models: [], // rows of GET /v1/adapters
  running: null, // AbortController of the compare in flight
};

// ---- talking to the server -------------------------------------------------------------------

class ApiError extends Error {}

/** What an HTTP failure means for the person at the page, in plain words. */
function plainWords(status, body) {
  const message = body?.error?.message ?? "";
  switch (status) {
    case 401:
      return "The API key was not accepted. Enter a valid key at the top of the page.";
    case 403:
      return `Not allowed: ${message || "this API key may not do that."}`;
    case 404:
      return `Not found: ${message || "the server has no such route or model."}`;
    case 413:
      return "The request is larger than this server accepts.";
    case 429:
    case 503:
      return `The server is busy or shutting down; try again in a moment. (${message})`;
    default:
      if (status >= 400 && status < 500) return `The server refused the request: ${message}`;
      return `The server failed (${status}): ${message || "no details"}`;
  }
}

/** fetch with the key; resolves to the Response, or throws an ApiError in plain words. */
async function call(path, body, signal) {
  const headers = {};
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  const init = { headers, signal };
  if (body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError("The server cannot be reached. Is it still running?");
  }
  if (!response.ok) {
    const detail = await response.json().catch(() => null);
    throw new ApiError(plainWords(response.status, detail));
  }
  return response;
}

/** The JSON documents of an SSE response (`data: {...}` events), until `data: [DONE]`. */
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const lines = buffer.slice(0, cut).split("\n");
      buffer = buffer.slice(cut + 2);
      const data = lines
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trim())
        .join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

// ---- messages --------------------------------------------------------------------------------

function showError(text) {
  const box = $("#error");
  box.textContent = text;
  box.hidden = !text;
}

function showNotice(text) {
  const box = $("#notice");
  box.textContent = text;
  box.hidden = !text;
}

/** Run an action; its ApiError (or any failure) becomes the page's error line. */
async function guarded(action) {
  try {
    await action();
  } catch (error) {
    if (error.name !== "AbortError") showError(error.message);
  }
}

// ---- the models table ------------------------------------------------------------------------

function formatBytes(bytes) {
  if (bytes == null) return "-";
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(0)} KiB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function renderModels(listing) {
  state.role = listing.role;
  state.models = listing.data;
  const admin = listing.role === "admin";
  document.querySelectorAll(".admin-only").forEach((el) => (el.hidden = !admin));
  const base = listing.data.find((m) => m.parent === null);
  $("#base").textContent = base ? `base ${base.id}` : "";
  const device = listing.device;
  $("#device").textContent =
    `${device.resident_adapters} adapters on the device: ` +
    `${formatBytes(device.used_bytes)} of the ${formatBytes(device.budget_bytes)} adapter budget ` +
    `(${formatBytes(device.free_bytes)} free)`;

  const body = $("#models tbody");
  body.replaceChildren();
  for (const model of listing.data) {
    const row = body.insertRow();
    row.dataset.model = model.id;
    cell(row, model.id).title = model.parent ? `adapter of ${model.parent}` : "the bare base";
    cell(row, model.rank ?? "-", "num");
    const tier = cell(row, "");
    if (model.tier) {
      const badge = document.createElement("span");
      badge.className = `tier tier-${model.tier}`;
      badge.textContent = model.tier;
      tier.append(badge);
    } else {
      tier.textContent = "base";
    }
    cell(row, formatBytes(model.bytes), "num");
    cell(row, model.requests, "num");
    cell(row, model.generated_tokens, "num");
    if (admin) {
      const actions = cell(row, "");
      if (model.parent !== null) {
        const unload = document.createElement("button");
        unload.type = "button";
        unload.className = "secondary";
        unload.textContent = "Unload";
        unload.addEventListener("click", () => guarded(() => unloadAdapter(model.id)));
        actions.append(unload);
      }
    }
  }
  renderChoices();
}

/** One checkbox per model in the compare form; choices survive a refresh. */
function renderChoices() {
  const box = $("#choices");
  const checked = new Set(
    [...box.querySelectorAll("input:checked")].map((input) => input.value),
  );
  const first = box.children.length === 0;
  box.replaceChildren();
  state.models.forEach((model, i) => {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "checkbox";
    input.value = model.id;
    input.checked = first ? i < 2 : checked.has(model.id);
    label.append(input, ` ${model.id}`);
    box.append(label);
  });
}

/** Reread the models; on failure the table empties (nothing stale is left on show). */
async function refresh() {
  try {
    const response = await call("/v1/adapters");
    renderModels(await response.json());
  } catch (error) {
    $("#models tbody").replaceChildren();
    $("#choices").replaceChildren();
    $("#device").textContent = "";
    throw error;
  }
  showError("");
}

async function loadAdapter(event) {
  event.preventDefault();
  const name = $("#load-name").value.trim();
  const path = $("#load-path").value.trim();
  await call("/v1/load_lora_adapter", { lora_name: name, lora_path: path });
  showNotice(`Adapter ${name} loaded.`);
  $("#load-form").reset();
  await refresh();
}

async function unloadAdapter(name) {
  await call("/v1/unload_lora_adapter", { lora_name: name });
  showNotice(`Adapter ${name} unloaded.`);
  await refresh();
}

// ---- compare ---------------------------------------------------------------------------------

function number(selector) {
  const text = $(selector).value.trim();
  return text === "" ? undefined : Number(text);
}

/** The request body for one model from the compare form's settings. */
function requestBody(model) {
  const mode = document.querySelector("input[name=mode]:checked").value;
  const prompt = $("#prompt").value;
  const body = {
    model,
    max_tokens: number("#max-tokens"),
    temperature: number("#temperature"),
    top_p: number("#top-p"),
    seed: number("#seed"),
    stream: true,
    stream_options: { include_usage: true },
  };
  if (mode === "chat") body.messages = [{ role: "user", content: prompt }];
  else body.prompt = prompt;
  return { path: mode === "chat" ? "/v1/chat/completions" : "/v1/completions", body };
}

/** Stream one model's answer into its column, with time to first token and tokens per second. */
async function streamInto(column, model, signal) {
  const answer = column.querySelector(".answer");
  const stats = column.querySelector(".column-stats");
  const fail = column.querySelector(".column-error");
  const { path, body } = requestBody(model);
  const start = performance.now();
  let first = null;
  let last = null;
  let pieces = 0;
  let finish = null;
  let usage = null;
  const show = () => {
    const parts = [];
    if (first !== null) parts.push(`TTFT ${(first - start).toFixed(0)} ms`);
    const tokens = usage?.completion_tokens ?? pieces;
    if (first !== null && last > first && tokens > 1) {
      parts.push(`${((tokens - 1) / ((last - first) / 1000)).toFixed(1)} tok/s`);
    }
    parts.push(`${tokens} tokens`);
    if (finish) parts.push(`finish: ${finish}`);
    stats.textContent = parts.join(" · ");
  };
  try {
    const response = await call(path, body, signal);
    stats.textContent = "streaming";
    for await (const event of events(response)) {
      if (event.error) throw new ApiError(`The generation failed: ${event.error.message}`);
      if (event.usage) usage = event.usage;
      const choice = event.choices?.[0];
      if (!choice) continue;
      const text = choice.delta?.content ?? choice.text ?? "";
      if (text) {
        const now = performance.now();
        first ??= now;
        last = now;
        pieces += 1;
        answer.textContent += text;
      }
      finish = choice.finish_reason ?? finish;
      show();
    }
    show();
    column.classList.add("done");
  } catch (error) {
    fail.textContent = error.name === "AbortError" ? "Stopped." : error.message;
    fail.hidden = false;
    column.classList.add("failed");
  }
}

async function compare(event) {
  event.preventDefault();
  const models = [...document.querySelectorAll("#choices input:checked")].map((i) => i.value);
  if (models.length === 0) {
    showError("Choose at least one model to compare.");
    return;
  }
  showError("");
  const controller = new AbortController();
  state.running = controller;
  $("#run").disabled = true;
  $("#stop").disabled = false;
  const columns = $("#columns");
  columns.replaceChildren();
  const runs = models.map((model) => {
    const column = $("#column-template").content.firstElementChild.cloneNode(true);
    column.dataset.model = model;
    column.querySelector(".column-model").textContent = model;
    columns.append(column);
    return streamInto(column, model, controller.signal);
  });
  await Promise.all(runs);
  state.running = null;
  $("#run").disabled = false;
  $("#stop").disabled = true;
  await guarded(refresh); // the counters moved
}

// ---- start -----------------------------------------------------------------------------------

function useKey(event) {
  event.preventDefault();
  state.key = $("#api-key").value.trim();
  if (state.key) sessionStorage.setItem(KEY_STORAGE, state.key);
  else sessionStorage.removeItem(KEY_STORAGE);
  showNotice("");
  guarded(refresh);
}

$("#api-key").value = state.key;
$("#key-form").addEventListener("submit", useKey);
$("#refresh").addEventListener("click", () => guarded(refresh));
$("#load-form").addEventListener("submit", (event) => guarded(() => loadAdapter(event)));
$("#compare-form").addEventListener("submit", compare);
$("#stop").addEventListener("click", () => state.running?.abort());
setInterval(() => {
  if (!document.hidden && !state.running) guarded(refresh);
}, REFRESH_MS);
guarded(refresh);
