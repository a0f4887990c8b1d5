// AudioWorklet processors for the browser test call (loaded by talk.js).
//
// capture: microphone at the context's rate (usually 48 kHz) -> low-pass FIR (cut-off
//   3.6 kHz, below the 4 kHz Nyquist of the pipeline's 8 kHz) -> fractional resampling to
//   8 kHz -> G.711 mu-law -> 160-byte (20 ms) frames posted to the page.
// playback: mu-law 8 kHz from the service -> linear PCM -> resampled to the context's rate
//   and queued; marks sit in the queue at the sample they follow and are posted back once
//   played; "clear" drops the queue at once and posts every mark behind it (flagged
//   `cleared`: its audio was not heard). This is what Twilio does with a call's marks, and
//   what the service judges the heard part of an interrupted answer by. It also counts
//   what it played per talkspurt (agent audio without a gap over TALKSPURT_GAP_S).

const PIPELINE_RATE = 8000;
const FRAME_BYTES = 160;
const TALKSPURT_GAP_S = 0.1;

function muLawEncode(sample) {
  const BIAS = 0x84, CLIP = 32635;
  let s = Math.max(-1, Math.min(1, sample)) * 32767;
  const sign = s < 0 ? 0x80 : 0;
  s = Math.min(Math.abs(s), CLIP) + BIAS;
  let exponent = 7;
  for (let mask = 0x4000; (s & mask) === 0 && exponent > 0; mask >>= 1) exponent--;
  const mantissa = (s >> (exponent + 3)) & 0x0f;
  return ~(sign | (exponent << 4) | mantissa) & 0xff;
}

function muLawDecode(byte) {
  const u = ~byte & 0xff;
  const sign = u & 0x80, exponent = (u >> 4) & 0x07, mantissa = u & 0x0f;
  const magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84;
  return (sign ? -magnitude : magnitude) / 32768;
}

function lowPassTaps(rate, cutoff, count) {
  // windowed sinc (Blackman), unity gain at DC
  const taps = new Float32Array(count), mid = (count - 1) / 2, fc = cutoff / rate;
  let sum = 0;
  for (let i = 0; i < count; i++) {
    const x = i - mid;
    const sinc = x === 0 ? 2 * fc : Math.sin(2 * Math.PI * fc * x) / (Math.PI * x);
    const w = 0.42 - 0.5 * Math.cos((2 * Math.PI * i) / (count - 1)) + 0.08 * Math.cos((4 * Math.PI * i) / (count - 1));
    taps[i] = sinc * w; sum += taps[i];
  }
  for (let i = 0; i < count; i++) taps[i] /= sum;
  return taps;
}

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / PIPELINE_RATE;          // input samples per output sample
    this.taps = lowPassTaps(sampleRate, 3600, 63);
    this.history = new Float32Array(this.taps.length);
    this.filtered = [];                                // low-passed input not yet consumed
    this.position = 0;                                 // fractional read position in `filtered`
    this.frame = new Uint8Array(FRAME_BYTES);
    this.fill = 0;
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (!input) return true;
    const taps = this.taps, history = this.history, n = taps.length;
    for (let i = 0; i < input.length; i++) {
      history.copyWithin(0, 1);
      history[n - 1] = input[i];
      let acc = 0;
      for (let k = 0; k < n; k++) acc += history[k] * taps[k];
      this.filtered.push(acc);
    }
    while (this.position + 1 < this.filtered.length) {
      const index = Math.floor(this.position), frac = this.position - index;
      const sample = this.filtered[index] * (1 - frac) + this.filtered[index + 1] * frac;
      this.frame[this.fill++] = muLawEncode(sample);
      if (this.fill === FRAME_BYTES) {
        this.port.postMessage(this.frame.slice(0));
        this.fill = 0;
      }
      this.position += this.step;
    }
    const used = Math.floor(this.position);
    this.filtered.splice(0, used);
    this.position -= used;
    return true;
  }
}

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = [];        // Float32Array chunks at the context's rate
    this.offset = 0;        // read position in queue[0]
    this.queued = 0;        // samples queued in total so far
    this.played = 0;        // samples played in total so far
    this.marks = [];        // {name, at}: post when played >= at
    this.audible = 0;       // samples of agent audio played (for the tests and the page)
    this.spurts = [];       // samples played per talkspurt
    this.idle = Infinity;   // samples since agent audio last played
    this.lastReport = 0;
    this.previous = 0;      // last decoded sample, for interpolation across messages
    this.port.onmessage = (event) => this.receive(event.data);
  }

  receive(message) {
    if (message.type === "audio") {
      const bytes = message.data, ratio = sampleRate / PIPELINE_RATE;
      const out = new Float32Array(Math.round(bytes.length * ratio));
      let prev = this.previous;
      for (let i = 0; i < out.length; i++) {
        const pos = i / ratio, index = Math.floor(pos), frac = pos - index;
        const a = index === 0 ? prev : muLawDecode(bytes[index - 1]);
        const b = muLawDecode(bytes[Math.min(index, bytes.length - 1)]);
        out[i] = a * (1 - frac) + b * frac;
      }
      this.previous = muLawDecode(bytes[bytes.length - 1]);
      this.queue.push(out);
      this.queued += out.length;
    } else if (message.type === "mark") {
      this.marks.push({ name: message.name, at: this.queued });
    } else if (message.type === "clear") {
      this.queue = []; this.offset = 0;
      this.queued = this.played;
      for (const mark of this.marks) this.port.postMessage({ type: "mark", name: mark.name, cleared: true });
      this.marks = [];
      this.idle = Infinity; // what plays next is a new talkspurt
      this.port.postMessage({ type: "cleared", audibleMs: this.ms(this.audible) });
    }
  }

  process(_inputs, outputs) {
    const output = outputs[0][0];
    let written = 0;
    while (written < output.length && this.queue.length) {
      const chunk = this.queue[0];
      const take = Math.min(chunk.length - this.offset, output.length - written);
      output.set(chunk.subarray(this.offset, this.offset + take), written);
      written += take; this.offset += take;
      if (this.offset >= chunk.length) { this.queue.shift(); this.offset = 0; }
    }
    this.played += written;
    this.audible += written;
    if (written > 0) {
      if (this.idle > TALKSPURT_GAP_S * sampleRate) this.spurts.push(0);
      this.spurts[this.spurts.length - 1] += written;
      this.idle = output.length - written;
    } else {
      this.idle += output.length;
    }
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(output);
    while (this.marks.length && this.marks[0].at <= this.played) {
      this.port.postMessage({ type: "mark", name: this.marks.shift().name, cleared: false });
    }
    if (currentTime - this.lastReport > 0.1) {
      this.lastReport = currentTime;
      this.port.postMessage({
        type: "played",
        audibleMs: this.ms(this.audible),
        queuedMs: this.ms(this.queued - this.played),
        talkspurtsMs: this.spurts.map((samples) => this.ms(samples)),
      });
    }
    return true;
  }

  ms(samples) {
    return (samples / sampleRate) * 1000;
  }
}

registerProcessor("capture", CaptureProcessor);
registerProcessor("playback", PlaybackProcessor);
