// Upload an image, or for a digit dataset draw on the canvas (white on black, as MNIST):
// while drawing, POST the canvas as PNG to /predict at most every THROTTLE_MS, one
// request at a time, and show the answer: the class and each class's probability. When the
// server collects corrections (--collect), offer "right" or "wrong, it is: <class>" after
// each answer, and POST the image that answer was for to /feedback?label=<class>.
"use strict";
const THROTTLE_MS = 150;
const dataset = JSON.parse(document.getElementById("app").dataset.dataset);
const drawable = dataset.preparation === "digits";
const canvas = document.getElementById("canvas");
const ctx = canvas.getContext("2d");
const preview = document.getElementById("preview");
const digitEl = document.getElementById("digit");
const statusEl = document.getElementById("status");
const chart = document.getElementById("chart");
const idle = drawable ? "draw a digit or upload an image" : "upload an image";
const collecting = document.getElementById("app").dataset.collect === "on";
const feedbackEl = document.getElementById("feedback");
const filedEl = document.getElementById("filed");
let shown = null; // {blob, label}: the image whose answer is on screen

document.getElementById("title").textContent = drawable ? "Draw a digit" : `Classify an image: ${dataset.name}`;
document.getElementById("hint").textContent = drawable
  ? "Draw one digit, 0 to 9, with the mouse, a pen or a finger, or upload a photo of one."
  : `Upload an image of one of: ${dataset.classes.join(", ")}.`;
canvas.hidden = !drawable;
document.getElementById("clear").hidden = !drawable;
preview.hidden = drawable;
statusEl.textContent = idle;

const cols = [];
chart.classList.toggle("many", dataset.classes.length > 12 || dataset.classes.some((c) => c.length > 2));
for (const name of dataset.classes) {
  const col = document.createElement("div");
  col.className = "col";
  col.innerHTML = '<span class="pct"></span><div class="track"><div class="fill"></div></div>' +
    '<span class="label"></span>';
  col.querySelector(".label").textContent = name; // a folder's name: text, never markup
  col.title = name;
  chart.appendChild(col);
  cols.push(col);
}

const labelButtons = dataset.classes.map((name) => {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = name; // a folder's name: text, never markup
  button.addEventListener("click", () => fileCorrection(name));
  document.getElementById("labels").appendChild(button);
  return button;
});
const feedbackButtons = [document.getElementById("right"), ...labelButtons];
document.getElementById("right").addEventListener("click", () => fileCorrection(shown.label));

function offerFeedback(answered) {
  shown = answered;
  feedbackEl.hidden = !collecting || !answered;
  feedbackButtons.forEach((b) => { b.disabled = false; });
  filedEl.textContent = "";
}

async function fileCorrection(label) {
  if (!shown) return;
  feedbackButtons.forEach((b) => { b.disabled = true; });
  try {
    const response = await fetch(`/feedback?label=${encodeURIComponent(label)}`, {
      method: "POST", headers: { "Content-Type": shown.blob.type || "application/octet-stream" },
      body: shown.blob,
    });
    const answer = await response.json();
    filedEl.textContent = response.ok
      ? (answer.new ? `filed as ${label}, thank you` : `filed as ${label} already`)
      : answer.error;
    if (!response.ok) feedbackButtons.forEach((b) => { b.disabled = false; });
  } catch (e) {
    filedEl.textContent = "server not reachable";
    feedbackButtons.forEach((b) => { b.disabled = false; });
  }
}

function showProbabilities(probs) {
  const top = probs ? probs.indexOf(Math.max(...probs)) : -1;
  cols.forEach((col, d) => {
    const p = probs ? probs[d] : 0;
    col.querySelector(".fill").style.height = `${100 * p}%`;
    col.querySelector(".pct").textContent = p >= 0.01 ? `${Math.round(100 * p)}%` : "";
    col.classList.toggle("top", d === top);
  });
}

function clearCanvas() {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.strokeStyle = "#fff";
  ctx.lineWidth = 20; // about MNIST's stroke for a digit drawn 200 px tall
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
}

// Requests: one in flight; a change made meanwhile is sent when it returns.
let inFlight = false, pending = false, lastSent = 0, timer = null, generation = 0;

function schedule() {
  if (inFlight) { pending = true; return; }
  const wait = lastSent + THROTTLE_MS - performance.now();
  if (wait > 0) { if (!timer) timer = setTimeout(() => { timer = null; schedule(); }, wait); return; }
  send();
}

async function predict(blob, sentFor) {
  try {
    const response = await fetch("/predict", {
      method: "POST", headers: { "Content-Type": blob.type || "application/octet-stream" }, body: blob,
    });
    const answer = await response.json();
    if (sentFor !== generation) return; // cleared meanwhile
    if (response.ok) {
      digitEl.textContent = answer.class;
      digitEl.classList.toggle("word", answer.class.length > 2);
      statusEl.textContent = `${(100 * answer.probability).toFixed(1)}% sure, ${answer.ms.toFixed(1)} ms`;
      showProbabilities(answer.probabilities);
      offerFeedback({ blob, label: answer.class });
    } else {
      digitEl.textContent = "–";
      statusEl.textContent = answer.error;
      showProbabilities(null);
      offerFeedback(null);
    }
  } catch (e) {
    statusEl.textContent = "server not reachable";
  }
}

function send() {
  inFlight = true; pending = false; lastSent = performance.now();
  const sentFor = generation;
  canvas.toBlob(async (blob) => {
    await predict(blob, sentFor);
    inFlight = false;
    if (pending) schedule();
  }, "image/png");
}

document.getElementById("upload").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (!file) return;
  generation++; pending = false;
  offerFeedback(null);
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  canvas.hidden = true;
  predict(file, generation);
  event.target.value = ""; // the same file again is a new upload
});

function point(event) {
  const rect = canvas.getBoundingClientRect();
  return [(event.clientX - rect.left) * canvas.width / rect.width,
          (event.clientY - rect.top) * canvas.height / rect.height];
}

let drawing = false, last = null;
canvas.addEventListener("pointerdown", (event) => {
  drawing = true;
  canvas.setPointerCapture(event.pointerId);
  last = point(event);
  ctx.beginPath(); ctx.moveTo(...last); ctx.lineTo(...last); ctx.stroke(); // a dot
  schedule();
});
canvas.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  ctx.beginPath(); ctx.moveTo(...last);
  for (const e of events.length ? events : [event]) { last = point(e); ctx.lineTo(...last); }
  ctx.stroke();
  schedule();
});
for (const type of ["pointerup", "pointercancel"]) {
  canvas.addEventListener(type, () => { if (drawing) { drawing = false; schedule(); } });
}

document.getElementById("clear").addEventListener("click", () => {
  generation++; pending = false;
  clearCanvas();
  canvas.hidden = false;
  preview.hidden = true;
  digitEl.textContent = "–";
  statusEl.textContent = idle;
  showProbabilities(null);
  offerFeedback(null);
});

clearCanvas();
showProbabilities(null);
