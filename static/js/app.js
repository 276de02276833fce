// Progressive enhancement only: every action here also works without JavaScript (forms and links).
"use strict";

document.documentElement.classList.add("js");

document.addEventListener("DOMContentLoaded", () => {
  enhanceUpload();
  enhanceViewer();
});

// Upload page: drop files anywhere on the drop zone, list the chosen files, show progress on submit.
function enhanceUpload() {
  const zone = document.getElementById("dropzone");
  const input = document.getElementById("file");
  const list = document.getElementById("file-list");
  if (!zone || !input) return;
  const showFiles = () => {
    const names = Array.from(input.files, (f) => f.name);
    list.textContent = names.length ? `${names.length} file(s): ${names.join(", ")}` : "";
  };
  input.addEventListener("change", showFiles);
  ["dragenter", "dragover"].forEach((type) => zone.addEventListener(type, (event) => {
    event.preventDefault();
    zone.classList.add("dragover");
  }));
  ["dragleave", "drop"].forEach((type) => zone.addEventListener(type, () => zone.classList.remove("dragover")));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      showFiles();
    }
  });
  const form = zone.closest("form");
  const button = document.getElementById("submit");
  form.addEventListener("submit", () => {
    if (button) {
      button.disabled = true;
      button.textContent = "Analysing…";
    }
  });
}

// Result page: switch the heatmap label, its opacity and the plain view in place (no reload).
function enhanceViewer() {
  const heat = document.getElementById("heat");
  if (!heat) return;
  const opacity = document.getElementById("opacity");
  const plain = document.getElementById("plain");
  const labelInput = document.getElementById("label-input");
  const setOpacity = () => {
    heat.className = "heat";  // drop the server-side op-N class
    heat.style.opacity = String(Number(opacity.value) / 100);
  };
  opacity.step = "1";
  opacity.addEventListener("input", setOpacity);
  plain.addEventListener("change", () => { heat.hidden = plain.checked; });

  const scaleInputs = document.querySelectorAll('input[name="scale"]');
  const scale = () => (document.querySelector('input[name="scale"]:checked') || { value: "own" }).value;
  const caption = document.getElementById("heat-text");
  const peak = document.getElementById("legend-peak");
  // The previous label's map must never stand under a new caption: hide the layer until the new one has loaded.
  heat.addEventListener("load", () => heat.classList.remove("loading"));
  heat.addEventListener("error", () => heat.classList.remove("loading"));
  const show = (link) => {
    const supported = link.dataset.support !== "no";
    const url = new URL(link.dataset.heatmap, window.location.href);
    if (scale() === "shared") url.searchParams.set("scale", "shared");
    heat.classList.add("loading");
    heat.src = url.pathname + url.search;
    heat.alt = `Heatmap for ${link.dataset.name}`;
    heat.hidden = plain.checked || !supported;
    labelInput.value = link.dataset.label;
    document.getElementById("heat-label").textContent = link.dataset.name;
    caption.textContent = supported
      ? "where the evidence for this finding lies, brightest strongest. A class activation map, not an outline of the finding."
      : "no region supports this finding (no positive evidence anywhere in the map).";
    peak.textContent = scale() === "shared" ? "peak over all labels" : "this map's peak";
  };
  scaleInputs.forEach((input) => input.addEventListener("change", () => {
    const current = document.querySelector(".label-link[aria-current]");
    if (current) show(current);
  }));

  document.querySelectorAll(".label-link").forEach((link) => {
    link.addEventListener("click", (event) => {
      event.preventDefault();
      plain.checked = false;
      show(link);
      document.querySelectorAll(".label-link[aria-current]").forEach((other) => {
        other.removeAttribute("aria-current");
        other.closest("tr").classList.remove("selected");
      });
      link.setAttribute("aria-current", "true");
      link.closest("tr").classList.add("selected");
      const url = new URL(link.href);
      url.searchParams.set("opacity", opacity.value);
      url.searchParams.set("scale", scale());
      history.replaceState(null, "", url);
    });
  });
}
