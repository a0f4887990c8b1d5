// The browser test call ("Talk to this agent"): microphone -> AudioWorklet (resampled to
// 8 kHz mu-law) -> WebSocket -> the same CallSession as a phone call; the agent's audio
// comes back on the socket and plays through the playback worklet, which echoes marks as
// they play and drops its queue at a "clear" (barge-in).
import { api } from "/console/static/console.js";

const box = document.getElementById("talk");
const agentId = box.dataset.agentId;
const startButton = document.getElementById("call-start");
const muteButton = document.getElementById("call-mute");
const hangupButton = document.getElementById("call-hangup");
const state = document.getElementById("call-state");
const playedOut = document.getElementById("played-ms");
const transcript = document.getElementById("transcript");
const SILENT_FRAME = new Uint8Array(160).fill(0xff);

// what the page did, for people and for the browser tests: marks echoed as their audio
// played (`marks`) or because a clear dropped it (`marksCleared`), the agent audio played
// per talkspurt and in all at each clear
const talk = {
  callId: null, audibleMs: 0, framesSent: 0, framesReceived: 0, clears: 0, marks: 0,
  marksCleared: 0, talkspurtsMs: [], clearedAtMs: [], ended: false,
};
window.__talk = talk;

let socket = null, context = null, stream = null, muted = false, poller = null;

async function start() {
  startButton.disabled = true;
  state.textContent = "Starting…";
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
  } catch (error) {
    state.textContent = `No microphone: ${error.message}`;
    startButton.disabled = false;
    return;
  }
  context = new AudioContext({ latencyHint: "interactive" });
  await context.audioWorklet.addModule("/console/static/worklets.js");
  const source = context.createMediaStreamSource(stream);
  const capture = new AudioWorkletNode(context, "capture");
  const playback = new AudioWorkletNode(context, "playback", { outputChannelCount: [1] });
  source.connect(capture);
  playback.connect(context.destination);
  await context.resume();

  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  socket = new WebSocket(`${scheme}//${location.host}/console/agents/${agentId}/talk/ws`);
  socket.binaryType = "arraybuffer";
  socket.onopen = () => socket.send(JSON.stringify({ type: "start" }));
  socket.onmessage = (event) => {
    if (event.data instanceof ArrayBuffer) {
      talk.framesReceived += 1;
      playback.port.postMessage({ type: "audio", data: new Uint8Array(event.data) });
      return;
    }
    const message = JSON.parse(event.data);
    if (message.type === "started") {
      talk.callId = message.call_id;
      const link = document.createElement("a");
      link.href = `/console/calls/${message.call_id}`;
      link.textContent = message.call_id;
      document.getElementById("call-link").replaceChildren(link);
      state.textContent = "On the call.";
      poller = setInterval(refreshTranscript, 700);
    } else if (message.type === "mark") {
      playback.port.postMessage({ type: "mark", name: message.name });
    } else if (message.type === "clear") {
      talk.clears += 1;
      playback.port.postMessage({ type: "clear" });
    }
  };
  socket.onclose = () => finish("Call ended.");
  capture.port.onmessage = (event) => {
    if (socket && socket.readyState === WebSocket.OPEN) {
      socket.send(muted ? SILENT_FRAME : event.data);
      talk.framesSent += 1;
    }
  };
  playback.port.onmessage = (event) => {
    const message = event.data;
    if (message.type === "mark") {
      if (message.cleared) talk.marksCleared += 1;
      else talk.marks += 1;
      if (socket && socket.readyState === WebSocket.OPEN) {
        socket.send(JSON.stringify({ type: "mark", name: message.name }));
      }
    } else if (message.type === "cleared") {
      talk.clearedAtMs.push(message.audibleMs);
    } else if (message.type === "played") {
      talk.audibleMs = message.audibleMs;
      talk.queuedMs = message.queuedMs;
      talk.talkspurtsMs = message.talkspurtsMs;
      playedOut.textContent = `${Math.round(message.audibleMs)} ms`;
    }
  };
  muteButton.disabled = false;
  hangupButton.disabled = false;
}

async function refreshTranscript() {
  if (!talk.callId) return;
  const result = await api("GET", `/v1/calls/${talk.callId}`);
  if (!result.ok) return;
  const rows = result.data.turns.map((turn) => {
    const li = document.createElement("li");
    li.className = `turn-row ${turn.role}`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = turn.role === "user" ? "You" : "Agent";
    const text = document.createElement("p");
    text.textContent = turn.text + (turn.interrupted ? " (interrupted)" : "");
    li.append(who, text);
    return li;
  });
  transcript.replaceChildren(...rows);
  if (talk.ended && result.data.ended_reason) clearInterval(poller);
}

function finish(message) {
  if (talk.ended) return;
  talk.ended = true;
  state.textContent = message;
  muteButton.disabled = hangupButton.disabled = true;
  stream?.getTracks().forEach((track) => track.stop());
  context?.close();
  setTimeout(refreshTranscript, 500);
}

function hangUp() {
  if (socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({ type: "stop" }));
    socket.close(1000);
  }
  finish("You hung up.");
}

startButton.addEventListener("click", start);
hangupButton.addEventListener("click", hangUp);
muteButton.addEventListener("click", () => {
  muted = !muted;
  muteButton.setAttribute("aria-pressed", String(muted));
  muteButton.textContent = muted ? "Unmute" : "Mute";
});
