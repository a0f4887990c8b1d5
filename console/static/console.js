// The console's page scripts: no framework, no build step. Pages are rendered on the
// server; these calls go to the /v1 API with the session cookie and the CSRF header, and
// show the API's own error shape ({"error": {code, message, field, details}}) inline.
const csrf = document.querySelector('meta[name="csrf-token"]')?.content || "";

export async function api(method, path, body, isForm = false) {
  const headers = { "X-CSRF-Token": csrf, Accept: "application/json" };
  if (body !== undefined && !isForm) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : isForm ? body : JSON.stringify(body),
  });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { error: { message: text } }; }
  return { ok: response.ok, status: response.status, data };
}

function show(element, message) {
  if (!element) return;
  element.textContent = message || "";
  element.hidden = !message;
}

// --- agent form -----------------------------------------------------------------------
function readAgentForm(form, creating) {
  const body = {};
  const problems = {};
  for (const field of form.querySelectorAll(".field")) {
    const name = field.dataset.field;
    const kind = field.dataset.kind;
    if (kind === "checks") {
      body[name] = [...field.querySelectorAll("input:checked")].map((i) => i.value);
      continue;
    }
    const input = field.querySelector("input, textarea, select");
    if (kind === "bool") { body[name] = input.checked; continue; }
    const raw = input.value.trim();
    if (kind === "lines") { body[name] = raw ? raw.split("\n").map((s) => s.trim()).filter(Boolean) : []; continue; }
    if (kind === "json") {
      if (!raw) { if (!creating) body[name] = name === "tools" ? [] : {}; continue; }
      try { body[name] = JSON.parse(raw); } catch (e) { problems[name] = `not valid JSON (${e.message})`; }
      continue;
    }
    if (raw === "") { if (!creating && name !== "name") body[name] = null; continue; }
    body[name] = kind === "number" ? Number(raw) : raw;
  }
  return { body, problems };
}

function showFieldErrors(form, errors) {
  for (const field of form.querySelectorAll(".field")) {
    const message = errors[field.dataset.field];
    field.classList.toggle("invalid", Boolean(message));
    show(field.querySelector(".field-error"), message);
    const input = field.querySelector("input, textarea, select");
    if (input) input.setAttribute("aria-invalid", message ? "true" : "false");
  }
  const first = form.querySelector(".field.invalid input, .field.invalid textarea, .field.invalid select");
  if (first) first.focus();
}

function apiErrors(data) {
  const error = (data && data.error) || {};
  const errors = {};
  for (const detail of error.details || [{ field: error.field, message: error.message }]) {
    const name = String(detail.field || "").split(".")[0];
    if (name && !errors[name]) errors[name] = detail.message;
  }
  return { errors, message: error.message || "request failed" };
}

function wireAgentForm() {
  const form = document.getElementById("agent-form");
  if (!form) return;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const agentId = form.dataset.agentId;
    const { body, problems } = readAgentForm(form, !agentId);
    show(document.getElementById("form-error"), "");
    if (Object.keys(problems).length) { showFieldErrors(form, problems); return; }
    const result = agentId
      ? await api("PATCH", `/v1/agents/${agentId}`, body)
      : await api("POST", "/v1/agents", body);
    if (result.ok) {
      showFieldErrors(form, {});
      if (!agentId) { window.location.assign(`/console/agents/${result.data.id}`); return; }
      document.getElementById("saved").textContent = "Saved.";
      return;
    }
    const { errors, message } = apiErrors(result.data);
    showFieldErrors(form, errors);
    if (!Object.keys(errors).some((name) => form.querySelector(`[data-field="${name}"]`))) {
      show(document.getElementById("form-error"), message);
    }
  });
}

// --- documents and questions ----------------------------------------------------------
function documentRow(doc) {
  const row = document.createElement("tr");
  row.dataset.documentId = doc.id;
  for (const text of [doc.filename, String(doc.chunk_count), `${doc.size_bytes} B`]) {
    const cell = document.createElement("td");
    cell.textContent = text;
    row.append(cell);
  }
  const cell = document.createElement("td");
  const button = document.createElement("button");
  button.type = "button"; button.className = "danger"; button.textContent = "Delete";
  button.dataset.deleteDocument = doc.id;
  cell.append(button); row.append(cell);
  return row;
}

function wireDocuments() {
  const form = document.getElementById("upload-form");
  if (!form) return;
  const agentId = form.dataset.agentId;
  const tbody = document.querySelector("#documents tbody");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const error = document.getElementById("upload-error");
    show(error, "");
    const result = await api("POST", `/v1/agents/${agentId}/documents`, new FormData(form), true);
    if (!result.ok) { show(error, apiErrors(result.data).message); return; }
    tbody.append(documentRow(result.data));
    form.reset();
  });
  tbody.addEventListener("click", async (event) => {
    const id = event.target.dataset?.deleteDocument;
    if (!id) return;
    const result = await api("DELETE", `/v1/agents/${agentId}/documents/${id}`);
    if (result.ok || result.status === 404) event.target.closest("tr").remove();
  });
  const ask = document.getElementById("ask-form");
  ask.addEventListener("submit", async (event) => {
    event.preventDefault();
    const list = document.getElementById("passages");
    list.replaceChildren();
    const query = ask.querySelector("input").value;
    const result = await api("POST", `/v1/agents/${agentId}/knowledge/search`, { query });
    if (!result.ok) { const li = document.createElement("li"); li.textContent = apiErrors(result.data).message; list.append(li); return; }
    if (!result.data.passages.length) { const li = document.createElement("li"); li.textContent = "No passage is close enough."; list.append(li); }
    for (const passage of result.data.passages) {
      const li = document.createElement("li");
      li.className = "passage";
      const meta = document.createElement("div");
      meta.className = "muted";
      meta.textContent = `${passage.source} · ${passage.heading || "—"} · similarity ${passage.similarity.toFixed(2)}`;
      const text = document.createElement("p");
      text.textContent = passage.text;
      li.append(meta, text);
      list.append(li);
    }
  });
}

// --- webhook redelivery ---------------------------------------------------------------
function wireRedeliver() {
  document.addEventListener("click", async (event) => {
    const id = event.target.dataset?.redeliver;
    if (!id) return;
    event.target.disabled = true;
    const result = await api("POST", `/v1/webhook-deliveries/${id}/redeliver`);
    const row = event.target.closest("tr");
    if (result.ok) {
      row.querySelector(".status").textContent = result.data.status;
      row.querySelector(".attempts").textContent = result.data.attempts;
      event.target.textContent = "Queued";
      setTimeout(() => refreshDelivery(id, row, event.target), 1000);
    } else {
      event.target.disabled = false;
      row.querySelector(".status").textContent = apiErrors(result.data).message;
    }
  });
}

async function refreshDelivery(id, row, button) {
  const result = await api("GET", `/v1/webhook-deliveries/${id}`);
  if (!result.ok) return;
  row.querySelector(".status").textContent = result.data.status;
  row.querySelector(".attempts").textContent = result.data.attempts;
  if (["pending", "delivering"].includes(result.data.status)) {
    setTimeout(() => refreshDelivery(id, row, button), 1000);
  } else { button.disabled = false; button.textContent = "Redeliver"; }
}

// --- live calls -----------------------------------------------------------------------
function liveRow(call) {
  const row = document.createElement("tr");
  row.id = `row-${call.id}`;
  row.dataset.callId = call.id;
  const link = document.createElement("a");
  link.href = `/console/calls/${call.id}`;
  link.textContent = call.created_at.slice(0, 19).replace("T", " ");
  const cells = [link, call.agent || "—", call.direction, "", "", ""];
  for (const content of cells) {
    const cell = document.createElement("td");
    cell.append(content);
    row.append(cell);
  }
  row.children[3].className = "status";
  row.children[4].className = "duration";
  row.children[5].className = "outcome";
  return row;
}

function wireLiveCalls() {
  const table = document.getElementById("calls");
  if (!table || !table.dataset.live) return;
  const status = document.getElementById("live-status");
  const source = new EventSource("/console/calls/live");
  source.addEventListener("open", () => { status.textContent = "Live: updates as calls happen."; });
  source.addEventListener("error", () => { status.textContent = "Live updates paused; reconnecting…"; });
  source.addEventListener("calls", (event) => {
    const tbody = table.tBodies[0];
    for (const call of JSON.parse(event.data).reverse()) {
      let row = document.getElementById(`row-${call.id}`);
      if (!row) {
        row = liveRow(call);
        tbody.querySelector("tr.empty")?.remove();
        tbody.prepend(row);
      }
      const cell = row.querySelector(".status");
      cell.textContent = call.status; cell.dataset.status = call.status;
      const seconds = call.duration_seconds ?? (call.started_at ? (Date.now() - Date.parse(call.started_at)) / 1000 : null);
      row.querySelector(".duration").textContent = seconds == null ? "—" : `${Math.round(seconds)} s`;
      row.querySelector(".outcome").textContent = call.outcome || "—";
    }
  });
  window.addEventListener("pagehide", () => source.close());
}

wireAgentForm();
wireDocuments();
wireRedeliver();
wireLiveCalls();
if (document.body.dataset.page === "talk") import("/console/static/talk.js");
