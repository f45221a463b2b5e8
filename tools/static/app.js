// Draw on the canvas (white on black, as MNIST); while drawing, POST the canvas as PNG
// to /predict at most every THROTTLE_MS, one request at a time, and show the answer.
"use strict";
const THROTTLE_MS = 150;
const canvas = document.getElementById("canvas");
const ctx = canvas.getContext("2d");
const digitEl = document.getElementById("digit");
const statusEl = document.getElementById("status");
const chart = document.getElementById("chart");

const cols = [];
for (let d = 0; d < 10; d++) {
  const col = document.createElement("div");
  col.className = "col";
  col.innerHTML = '<span class="pct"></span><div class="track"><div class="fill"></div></div>' +
    `<span class="label">${d}</span>`;
  chart.appendChild(col);
  cols.push(col);
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

function send() {
  inFlight = true; pending = false; lastSent = performance.now();
  const sentFor = generation;
  canvas.toBlob(async (blob) => {
    try {
      const response = await fetch("/predict", {
        method: "POST", headers: { "Content-Type": "image/png" }, body: blob,
      });
      const answer = await response.json();
      if (sentFor !== generation) return; // cleared meanwhile
      if (response.ok) {
        digitEl.textContent = answer.digit;
        const p = answer.probabilities[answer.digit];
        statusEl.textContent = `${(100 * p).toFixed(1)}% sure, ${answer.ms.toFixed(1)} ms`;
        showProbabilities(answer.probabilities);
      } else {
        digitEl.textContent = "–";
        statusEl.textContent = answer.error;
        showProbabilities(null);
      }
    } catch (e) {
      statusEl.textContent = "server not reachable";
    } finally {
      inFlight = false;
      if (pending) schedule();
    }
  }, "image/png");
}

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
  digitEl.textContent = "–";
  statusEl.textContent = "draw a digit";
  showProbabilities(null);
});

clearCanvas();
showProbabilities(null);
