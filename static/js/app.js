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

// ---- Size check and per-file progress on upload, the view in the URL, permalink copy, print, sorting ----
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

// ---- The image viewer: the result page's image, and both images of the compare page ----
// Window/level, zoom, pan and invert, by mouse, touch and keyboard. Each saved plain image (8-bit, with a DICOM
// file's own window already applied when it was read) is copied once into a canvas laid over its <img>; every change
// of window or invert redraws the canvas from those stored values through a 256-entry lookup table. The <img> stays
// under it for screen readers and pages without JavaScript. On the compare page one view (window, zoom, pan, invert)
// drives both images, so the same region of both is shown side by side.
document.addEventListener("DOMContentLoaded", enhanceImageTools);

const ZOOM_MIN = 1;
const ZOOM_MAX = 8;
const ZOOM_STEP = 1.25;
const PAN_STEP = 0.05;  // arrow keys move the zoomed image by this fraction of the viewport
const WINDOW_STEP = 8;  // Shift + arrow keys change width or level by this many display values

// DICOM PS3.3 C.11.2.1.2.1, the linear VOI function: display values 0..255 through window (width, level) -> 0..255.
function windowTable(width, level, invert) {
  const table = new Uint8ClampedArray(256);  // rounds and clamps on assignment
  for (let value = 0; value < 256; value++) {
    const shown = ((value - (level - 0.5)) / (width - 1) + 0.5) * 255;
    table[value] = invert ? 255 - Math.min(255, Math.max(0, shown)) : shown;
  }
  return table;
}

// One image in its viewport (.stack > .stage > img.xray, img.heat): draw(view) windows it, place(view) zooms and pans.
function imageViewer(viewport) {
  const stage = viewport.querySelector(".stage");
  const image = viewport.querySelector("img.xray");
  const canvas = document.createElement("canvas");
  canvas.className = "xray-canvas";
  canvas.setAttribute("aria-hidden", "true");
  let context = null;
  let pixels = null;  // the stored image's values, one byte per pixel
  let picture = null;  // the ImageData drawn into the canvas
  let shown = null;
  const draw = (view) => {
    shown = view;
    if (!context) return;
    const table = windowTable(view.width, view.level, view.invert);
    const data = picture.data;
    for (let i = 0, j = 0; i < pixels.length; i++, j += 4) {
      data[j] = data[j + 1] = data[j + 2] = table[pixels[i]];
    }
    context.putImageData(picture, 0, 0);
  };
  const place = (view) => {
    // CSSOM writes are allowed by the page's CSP (style-src 'self'); style attributes in the markup would not be.
    stage.style.transform = `translate(${(view.x * 100).toFixed(3)}%, ${(view.y * 100).toFixed(3)}%) scale(${view.zoom})`;
    viewport.dataset.zoom = String(view.zoom);
    viewport.dataset.width = String(view.width);
    viewport.dataset.level = String(view.level);
  };
  const load = () => {
    canvas.width = image.naturalWidth;
    canvas.height = image.naturalHeight;
    context = canvas.getContext("2d", {willReadFrequently: true});
    context.drawImage(image, 0, 0);
    picture = context.getImageData(0, 0, canvas.width, canvas.height);
    pixels = new Uint8Array(canvas.width * canvas.height);
    for (let i = 0; i < pixels.length; i++) pixels[i] = picture.data[4 * i];  // gray: R = G = B
    image.after(canvas);
    if (shown) draw(shown);
    viewport.classList.add("tools-ready");
  };
  // A broken image keeps the plain <img> (and its error): the tools then only zoom and pan it.
  image.decode().then(load, () => {});
  viewport.querySelectorAll("img").forEach((img) => { img.draggable = false; });
  viewport.tabIndex = 0;
  viewport.setAttribute("role", "group");
  viewport.setAttribute("aria-label", `${image.alt}: drag to set window and level; arrow keys pan a zoomed image, `
    + "Shift and arrow keys set window and level; press ? for all keyboard shortcuts");
  return {viewport, draw, place};
}

function enhanceImageTools() {
  const tools = document.getElementById("viewer-tools");
  const viewers = Array.from(document.querySelectorAll(".stack[data-viewer]"), imageViewer);
  if (!tools || !viewers.length) return;
  const viewports = viewers.map((viewer) => viewer.viewport);
  const readout = document.getElementById("viewer-readout");
  const shortcuts = document.getElementById("shortcuts");
  const invertButton = document.getElementById("invert");
  const presets = Array.from(tools.querySelectorAll("[data-preset]"));
  const start = presets.find((button) => button.dataset.preset === "original");
  const initial = {width: Number(start.dataset.width), level: Number(start.dataset.level)};
  const view = {...initial, invert: false, zoom: 1, x: 0, y: 0};  // x, y: the stage's offset, fractions of its size
  let frame = 0;

  const draw = () => {
    frame = 0;
    viewers.forEach((viewer) => viewer.draw(view));
  };
  const show = () => {
    view.x = Math.min(0, Math.max(1 - view.zoom, view.x));
    view.y = Math.min(0, Math.max(1 - view.zoom, view.y));
    viewers.forEach((viewer) => viewer.place(view));
    if (!frame) frame = requestAnimationFrame(draw);
    presets.forEach((button) => button.setAttribute("aria-pressed", String(
      Number(button.dataset.width) === view.width && Number(button.dataset.level) === view.level)));
    invertButton.setAttribute("aria-pressed", String(view.invert));
    readout.textContent = `Window ${view.width} · level ${view.level} · zoom ${Math.round(view.zoom * 100)} %`
      + (view.invert ? " · inverted" : "");
  };
  const setWindow = (width, level) => {
    view.width = Math.round(Math.min(512, Math.max(2, width)));
    view.level = Math.round(Math.min(255, Math.max(0, level)));
    show();
  };
  // Zoom to `zoom`, keeping the point (px, py) of the viewport (fractions of its size) where it is.
  const zoomTo = (zoom, px = 0.5, py = 0.5) => {
    const next = Math.min(ZOOM_MAX, Math.max(ZOOM_MIN, zoom));
    view.x = px - (px - view.x) * (next / view.zoom);
    view.y = py - (py - view.y) * (next / view.zoom);
    view.zoom = next;
    show();
  };
  const panBy = (dx, dy) => {
    view.x += dx;
    view.y += dy;
    show();
  };
  const reset = () => {
    Object.assign(view, initial, {invert: false, zoom: 1, x: 0, y: 0});
    show();
  };
  const dragMode = () => (tools.querySelector('input[name="drag"]:checked') || {value: "window"}).value;
  const setDragMode = (mode) => {
    tools.querySelector(`input[name="drag"][value="${mode}"]`).checked = true;
    viewports.forEach((viewport) => { viewport.dataset.mode = mode; });
  };

  tools.hidden = false;
  if (shortcuts) shortcuts.hidden = false;
  setDragMode(dragMode());
  show();

  presets.forEach((button) => button.addEventListener("click", () => {
    setWindow(Number(button.dataset.width), Number(button.dataset.level));
  }));
  document.getElementById("zoom-in").addEventListener("click", () => zoomTo(view.zoom * ZOOM_STEP));
  document.getElementById("zoom-out").addEventListener("click", () => zoomTo(view.zoom / ZOOM_STEP));
  invertButton.addEventListener("click", () => { view.invert = !view.invert; show(); });
  document.getElementById("reset").addEventListener("click", reset);
  tools.querySelectorAll('input[name="drag"]').forEach((input) => {
    input.addEventListener("change", () => setDragMode(dragMode()));
  });
  viewports.forEach((viewport) => followPointers(viewport));

  // Mouse, pen and touch through pointer events: one pointer drags (window/level or pan; the middle mouse button
  // always pans), two pointers pinch to zoom and move together to pan.
  function followPointers(viewport) {
    const pointers = new Map();
    const pair = () => {
      const [a, b] = Array.from(pointers.values());
      return {x: (a.x + b.x) / 2, y: (a.y + b.y) / 2, distance: Math.hypot(a.x - b.x, a.y - b.y) || 1};
    };
    viewport.addEventListener("pointerdown", (event) => {
      if (event.pointerType === "mouse" && event.button !== 0 && event.button !== 1) return;
      event.preventDefault();
      viewport.focus({preventScroll: true});
      viewport.setPointerCapture(event.pointerId);
      pointers.set(event.pointerId, {x: event.clientX, y: event.clientY, pan: event.button === 1,
        startX: event.clientX, startY: event.clientY, width: view.width, level: view.level});
    });
    viewport.addEventListener("pointermove", (event) => {
      const pointer = pointers.get(event.pointerId);
      if (!pointer) return;
      const box = viewport.getBoundingClientRect();
      if (pointers.size === 1) {
        if (pointer.pan || dragMode() === "pan") {
          panBy((event.clientX - pointer.x) / box.width, (event.clientY - pointer.y) / box.height);
        } else {  // a drag across the whole viewport spans the whole 0..255 range; up raises the level
          const scale = 256 / box.width;
          setWindow(pointer.width + (event.clientX - pointer.startX) * scale,
                    pointer.level - (event.clientY - pointer.startY) * scale);
        }
      } else if (pointers.size === 2) {
        const before = pair();
        pointer.x = event.clientX;
        pointer.y = event.clientY;
        const after = pair();
        view.x += (after.x - before.x) / box.width;
        view.y += (after.y - before.y) / box.height;
        zoomTo(view.zoom * after.distance / before.distance,
               (after.x - box.left) / box.width, (after.y - box.top) / box.height);
        return;
      }
      pointer.x = event.clientX;
      pointer.y = event.clientY;
    });
    const release = (event) => {
      pointers.delete(event.pointerId);
      // After a pinch the finger left on the image starts a new drag from here (no jump in window or level).
      pointers.forEach((pointer) => Object.assign(pointer, {startX: pointer.x, startY: pointer.y,
                                                            width: view.width, level: view.level}));
    };
    viewport.addEventListener("pointerup", release);
    viewport.addEventListener("pointercancel", release);
    viewport.addEventListener("dragstart", (event) => event.preventDefault());
    // Ctrl + wheel (and a trackpad's pinch, which browsers send as Ctrl + wheel) zooms about the pointer; a plain
    // wheel still scrolls the page.
    viewport.addEventListener("wheel", (event) => {
      if (!event.ctrlKey && !event.metaKey) return;
      event.preventDefault();
      const box = viewport.getBoundingClientRect();
      zoomTo(view.zoom * Math.exp(-event.deltaY / 300),
             (event.clientX - box.left) / box.width, (event.clientY - box.top) / box.height);
    }, {passive: false});
  }

  // Keyboard shortcuts, listed on the page (press ?). Not while typing in a field; arrow keys only on a focused
  // image, so that elsewhere they still scroll the page and move sliders.
  const opacity = document.getElementById("opacity");
  const plain = document.getElementById("plain");
  const stepOpacity = (step) => {
    if (!opacity) return;
    opacity.value = String(Math.min(100, Math.max(0, Number(opacity.value) + step)));
    opacity.dispatchEvent(new Event("input", {bubbles: true}));
    opacity.dispatchEvent(new Event("change", {bubbles: true}));
  };
  const typing = (target) => target instanceof Element && target.closest(
    'textarea, select, [contenteditable], input:not([type="checkbox"]):not([type="radio"]):not([type="range"])'
    + ':not([type="button"]):not([type="submit"])');
  document.addEventListener("keydown", (event) => {
    if (event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey || typing(event.target)) return;
    const onImage = viewports.includes(event.target);
    const arrows = {ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1]};
    const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
    const preset = presets[Number(key) - 1];
    if (key === "?" && shortcuts) {
      shortcuts.open = !shortcuts.open;
      if (shortcuts.open) shortcuts.scrollIntoView({block: "nearest"});
    } else if (key === "Escape" && shortcuts && shortcuts.open) {
      shortcuts.open = false;
    } else if (key === "+" || key === "=") {
      zoomTo(view.zoom * ZOOM_STEP);
    } else if (key === "-" || key === "_") {
      zoomTo(view.zoom / ZOOM_STEP);
    } else if (/^[1-9]$/.test(key) && preset) {
      preset.click();
    } else if (key === "i") {
      invertButton.click();
    } else if (key === "r") {
      reset();
    } else if (key === "m") {
      setDragMode(dragMode() === "pan" ? "window" : "pan");
    } else if ((key === "[" || key === "]") && opacity) {
      stepOpacity(key === "]" ? 10 : -10);
    } else if (key === "h" && plain) {
      plain.click();  // fires its change handlers: the heat layer, the URL
    } else if (onImage && arrows[key] && event.shiftKey) {
      const [dx, dy] = arrows[key];
      setWindow(view.width + dx * WINDOW_STEP, view.level - dy * WINDOW_STEP);
    } else if (onImage && arrows[key]) {
      const [dx, dy] = arrows[key];
      panBy(-dx * PAN_STEP, -dy * PAN_STEP);
    } else {
      return;
    }
    event.preventDefault();
  });
}

// Compare page: choosing the label or the opacity shows it at once (the form's button does it without a script).
document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("select[data-submit-on-change]").forEach((select) => {
    select.addEventListener("change", () => select.form.submit());
  });
});
