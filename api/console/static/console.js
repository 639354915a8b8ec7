// The console's only script: refreshes the overview's figures from /console/status.json every
// 5 s. Plain JS, no framework, nothing inline (the CSP allows scripts from /console/static only).
// Without it the page is complete as the server rendered it; with it, every element marked
// data-figure="a.b.c" gets the text of that path of the status JSON, formatted as its
// data-format says: the same formats as api/console/render.py.
"use strict";

const REFRESH_MS = 5000;
const DASH = "\u2013";

const FORMATS = {
  int: (v) => (v === null || v === undefined ? DASH : String(v)),
  rate: (v) => (v === null || v === undefined ? DASH : v < 100 ? v.toFixed(2) + "/s" : v.toFixed(0) + "/s"),
  seconds: (v) => {
    if (v === null || v === undefined) return DASH;
    if (v < 1) return (v * 1000).toFixed(1) + " ms";
    if (v < 120) return v.toFixed(2) + " s";
    return (v / 60).toFixed(1) + " min";
  },
  age: (v) => {
    if (v === null || v === undefined) return DASH;
    if (v < 120) return v.toFixed(0) + " s";
    if (v < 7200) return (v / 60).toFixed(0) + " min";
    return (v / 3600).toFixed(1) + " h";
  },
  time: (v) => (v ? v.replace("T", " ").replace(/(\.\d{3})\d*/, "$1").replace(/(Z|\+00:00)$/, "") + " UTC" : DASH),
};

function lookup(data, path) {
  return path.split(".").reduce((node, part) => (node === null || node === undefined ? undefined : node[part]), data);
}

function apply(data) {
  for (const element of document.querySelectorAll("[data-figure]")) {
    const value = lookup(data, element.dataset.figure);
    const format = FORMATS[element.dataset.format] || FORMATS.int;
    element.textContent = format(value === undefined ? null : value);
  }
  document.body.classList.remove("stale");
}

async function refresh(url) {
  try {
    const answer = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!answer.ok) {
      document.body.classList.add("stale");  // signed out or Redis down: keep the last figures
      return;
    }
    apply(await answer.json());
  } catch (error) {
    document.body.classList.add("stale");
  }
}

function start() {
  // Only where there are figures (the overview; not the page telling a tenant it may not).
  if (document.body.dataset.page !== "overview" || !document.querySelector("[data-figure]")) return;
  const url = "/console/status.json";
  window.setInterval(() => refresh(url), REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", start);
