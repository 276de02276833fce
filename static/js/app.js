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

// ---- Issue 13: size check and per-file progress on upload, the view in the URL, permalink copy, print, sorting ----
document.addEventListener("DOMContentLoaded", () => {
  guardUploadSize();
  uploadOneByOne();
  keepViewInUrl();
  copyPermalink();
  enablePrint();
  sortSummaryTable();
  forgetBatchPost();
});

function formatMegabytes(bytes) {
  return `${(bytes / 1048576).toFixed(bytes < 10 * 1048576 ? 1 : 0)} MB`;
}

function showUploadError(message) {
  const box = document.getElementById("upload-error");
  const button = document.getElementById("submit");
  box.textContent = message;
  box.hidden = !message;
  if (message && button) {
    button.disabled = false;
    button.textContent = "Analyse";
  }
}

// Upload page: refuse too many or too large files before sending anything (the server's limits are in the page).
function guardUploadSize() {
  const form = document.getElementById("upload-form");
  const input = document.getElementById("file");
  if (!form || !input) return;
  const maxBytes = Number(form.dataset.maxBytes);
  const maxFiles = Number(form.dataset.maxFiles);
  const check = () => {
    const files = Array.from(input.files);
    const total = files.reduce((sum, file) => sum + file.size, 0);
    if (files.length > maxFiles) {
      return `Too many files (${files.length}): choose at most ${maxFiles} at once.`;
    }
    if (total > maxBytes) {
      return `The chosen files are ${formatMegabytes(total)} in all; the limit is ${formatMegabytes(maxBytes)}. `
        + "Choose fewer or smaller files; nothing was sent.";
    }
    return "";
  };
  input.addEventListener("change", () => showUploadError(check()));
  form.addEventListener("submit", (event) => {
    const message = check();
    if (message) {
      event.preventDefault();
      showUploadError(message);
    }
  });
}

// Upload page, several files: send them one by one to the JSON API, showing each file's progress, then open the
// batch page with the files' names (posted with the result ids; the names are never stored).
function uploadOneByOne() {
  const form = document.getElementById("upload-form");
  const input = document.getElementById("file");
  if (!form || !input || !window.fetch) return;
  form.addEventListener("submit", async (event) => {
    const files = Array.from(input.files);
    if (event.defaultPrevented || files.length < 2) return;  // refused above, or one file: the plain form post
    event.preventDefault();
    const progress = document.getElementById("progress");
    const status = document.getElementById("progress-status");
    const list = document.getElementById("progress-list");
    progress.hidden = false;
    list.replaceChildren(...files.map((file) => {
      const item = document.createElement("li");
      item.className = "waiting";
      item.textContent = `${file.name}: waiting`;
      return item;
    }));
    const outcomes = [];
    for (const [index, file] of files.entries()) {
      const item = list.children[index];
      status.textContent = `Analysing ${index + 1} of ${files.length}: ${file.name}`;
      item.className = "working";
      item.textContent = `${file.name}: analysing…`;
      const body = new FormData();
      body.append("file", file, file.name);
      let outcome;
      try {
        const response = await fetch(form.dataset.api, {method: "POST", body, credentials: "same-origin"});
        const answer = await response.json();
        outcome = response.ok ? {id: answer.id, error: ""} : {id: "", error: answer.error || response.statusText};
        if (response.status === 503) {  // no model: every other file would fail the same way
          showUploadError(answer.error);
          progress.hidden = true;
          return;
        }
      } catch (error) {
        outcome = {id: "", error: `the upload failed (${error.message}); check the connection and try again`};
      }
      outcomes.push({name: file.name, ...outcome});
      item.className = outcome.id ? "done" : "failed";
      item.textContent = outcome.id ? `${file.name}: done` : `${file.name}: ${outcome.error}`;
    }
    if (!outcomes.some((outcome) => outcome.id)) {
      status.textContent = "None of the files could be analysed.";
      showUploadError("None of the files could be analysed: see the reasons above.");
      return;
    }
    status.textContent = "All files analysed: opening the results…";
    const batch = document.createElement("form");
    batch.method = "post";
    batch.action = form.dataset.results;
    batch.hidden = true;
    const field = (name, value) => {
      const hidden = document.createElement("input");
      hidden.type = "hidden";
      hidden.name = name;
      hidden.value = value;
      batch.append(hidden);
    };
    field("csrf_token", form.querySelector('input[name="csrf_token"]').value);
    outcomes.forEach((outcome) => {
      field("name", outcome.name);
      field("id", outcome.id);
      field("error", outcome.error);
    });
    document.body.append(batch);
    batch.submit();
  });
}

// Result page: the label, opacity, plain view and scale on screen are always the page's URL, the permalink and the
// PDF report's view, so a reload or a shared link shows the same view.
function viewUrl(base) {
  const url = new URL(base, location.href);
  const label = document.getElementById("label-input");
  const opacity = document.getElementById("opacity");
  const plain = document.getElementById("plain");
  const scale = document.querySelector('.viewer-controls [name="scale"]:checked, .viewer-controls select[name="scale"]');
  if (label) url.searchParams.set("label", label.value);
  if (opacity) url.searchParams.set("opacity", opacity.value);
  if (plain && plain.checked) url.searchParams.set("plain", "1");
  if (scale && scale.value && scale.value !== "own") url.searchParams.set("scale", scale.value);
  return url;
}

function keepViewInUrl() {
  const heat = document.getElementById("heat");
  const permalink = document.getElementById("permalink");
  if (!heat || !permalink) return;
  const description = document.getElementById("heat-description");
  const report = document.getElementById("report-link");
  const update = () => {
    const url = viewUrl(permalink.dataset.base);
    history.replaceState(null, "", url);
    permalink.href = url.pathname + url.search;
    if (report) report.href = viewUrl(report.dataset.base).pathname + url.search;
    const current = document.querySelector('.label-link[aria-current="true"]');
    const plain = document.getElementById("plain");
    if (description && current) {
      description.textContent = plain && plain.checked ? "Plain image shown, no heatmap." : current.dataset.description;
    }
  };
  document.querySelectorAll(".viewer-controls input, .viewer-controls select").forEach((control) => {
    control.addEventListener("change", update);
  });
  document.querySelectorAll(".label-link").forEach((link) => link.addEventListener("click", update));
}

// "Permalink" copies the link to the view on screen (the plain link still opens it where copying is not allowed).
function copyPermalink() {
  const permalink = document.getElementById("permalink");
  const status = document.getElementById("permalink-status");
  if (!permalink || !status || !navigator.clipboard) return;
  permalink.addEventListener("click", async (event) => {
    event.preventDefault();
    try {
      await navigator.clipboard.writeText(permalink.href);
      status.textContent = "Link copied";
    } catch (error) {
      location.href = permalink.href;
    }
  });
}

function enablePrint() {
  const button = document.getElementById("print-button");
  if (button) button.addEventListener("click", () => window.print());
}

// Batch page: sort the summary table by upload order, top probability or any finding without a reload.
function sortSummaryTable() {
  const select = document.getElementById("sort-by");
  const table = document.getElementById("summary-table");
  if (!select || !table) return;
  const body = table.tBodies[0];
  select.addEventListener("change", () => {
    const key = select.value;
    const value = (row) => {
      if (!key) return -Number(row.dataset.number);
      const text = key === "top" ? row.dataset.top : row.getAttribute(`data-p-${key.toLowerCase()}`);
      return text === undefined || text === null ? -Infinity : Number(text);
    };
    const rows = Array.from(body.rows).sort((a, b) => value(b) - value(a));
    body.append(...rows);
  });
}

// Batch page: a reload asks for the saved results by id (no names), instead of posting the form again.
function forgetBatchPost() {
  const form = document.getElementById("batch-form");
  if (form && form.dataset.permalink) history.replaceState(null, "", form.dataset.permalink);
}
