// cmn-explain page: draws word heatmaps and memory overlaps on canvases over the images.
// Everything it needs is in the page (one JSON block per study); it fetches nothing.
"use strict";
(function () {
  function bytes(b64) {
    var s = atob(b64), out = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }
  // The reference's plot uses OpenCV's JET colour map; this is the same piecewise-linear ramp.
  function jet(t) {
    function c(x) { return Math.max(0, Math.min(1, x)); }
    return [c(1.5 - Math.abs(4 * t - 3)), c(1.5 - Math.abs(4 * t - 2)), c(1.5 - Math.abs(4 * t - 1))];
  }
  function pct(x) { return (100 * x).toFixed(x < 0.01 ? 2 : 1) + "%"; }

  function Study(section) {
    var n = section.getAttribute("data-study");
    var d = JSON.parse(document.getElementById("data-" + n).textContent);
    var T = d.words.length, V = d.views, h = d.grid[0], w = d.grid[1], P = V * h * w;
    var att = bytes(d.att), mem = d.memory;
    var overlap = mem && mem.overlap ? bytes(mem.overlap) : null;
    var stages = section.querySelectorAll(".stage");
    var words = section.querySelectorAll(".w");
    var chips = section.querySelectorAll(".chip");
    var status = section.querySelector(".status");
    var memBox = section.querySelector(".memory");
    var layerSel = section.querySelector("select.layer");
    var state = { words: [], entity: -1, patch: -1 };
    var small = [];
    for (var v = 0; v < V; v++) {
      var c = document.createElement("canvas");
      c.width = w; c.height = h;
      small.push(c);
    }
    function mode() {
      var r = section.querySelector("input[type=radio]:checked");
      return r ? r.value : "attention";
    }
    function layerIndex() {
      return layerSel.value === "mean" ? d.layers : parseInt(layerSel.value, 10);
    }
    // Mean over the chosen words of one map per patch, in [0, 1] (maps are min-max scaled).
    function values(list) {
      var out = new Float32Array(P), m = mode();
      if (!list.length) return out;
      for (var k = 0; k < list.length; k++) {
        var i = list[k];
        if (m === "memory") {
          for (var p = 0; p < P; p++) out[p] += overlap[i * P + p] / 255;
        } else {
          var base = (layerIndex() * T + i) * P;
          for (var p2 = 0; p2 < P; p2++) out[p2] += att[base + p2] / 255;
        }
      }
      var lo = Infinity, hi = -Infinity;
      for (var q = 0; q < P; q++) { lo = Math.min(lo, out[q]); hi = Math.max(hi, out[q]); }
      for (var r = 0; r < P; r++) out[r] = hi > lo ? (out[r] - lo) / (hi - lo) : 0;
      return out;
    }
    function rangeText(list) {
      if (!list.length) return "";
      if (mode() === "memory") {
        var top = 0;
        for (var k = 0; k < list.length; k++)
          for (var p = 0; p < P; p++) top = Math.max(top, overlap[list[k] * P + p] / 255 * mem.overlap_max);
        return "memory overlap with the patches: up to " + pct(top) + " of the word's reading shared";
      }
      var lo = Infinity, hi = -Infinity, L = layerIndex();
      for (var j = 0; j < list.length; j++) {
        var at = (L * T + list[j]) * 2;
        lo = Math.min(lo, d.att_range[at]); hi = Math.max(hi, d.att_range[at + 1]);
      }
      return "attention per patch " + pct(lo) + " to " + pct(hi) + " (uniform would be " + pct(1 / P) + ")";
    }
    function draw() {
      var list = state.words, vals = values(list);
      for (var v = 0; v < V; v++) {
        var sc = small[v], sctx = sc.getContext("2d"), img = sctx.createImageData(w, h);
        for (var p = 0; p < h * w; p++) {
          var t = vals[v * h * w + p], col = jet(t);
          img.data[4 * p] = Math.round(255 * col[0]);
          img.data[4 * p + 1] = Math.round(255 * col[1]);
          img.data[4 * p + 2] = Math.round(255 * col[2]);
          img.data[4 * p + 3] = list.length ? Math.round(255 * (0.2 + 0.45 * t)) : 0;
        }
        sctx.putImageData(img, 0, 0);
        var canvas = stages[v].querySelector("canvas"), ctx = canvas.getContext("2d");
        ctx.clearRect(0, 0, canvas.width, canvas.height);
        ctx.imageSmoothingEnabled = true;
        ctx.drawImage(sc, 0, 0, canvas.width, canvas.height);
        if (state.patch >= 0 && Math.floor(state.patch / (h * w)) === v) {
          var q = state.patch % (h * w), pw = canvas.width / w, ph = canvas.height / h;
          ctx.strokeStyle = "#ffffff"; ctx.lineWidth = 2;
          ctx.strokeRect((q % w) * pw + 1, Math.floor(q / w) * ph + 1, pw - 2, ph - 2);
        }
      }
      for (var i = 0; i < words.length; i++) words[i].classList.toggle("on", list.indexOf(i) >= 0);
      for (var e = 0; e < chips.length; e++) chips[e].classList.toggle("on", e === state.entity);
      var what = list.map(function (i) { return d.words[i]; }).join(" ");
      status.textContent = list.length ? "\u201c" + what + "\u201d: " + rangeText(list) : "";
      section.setAttribute("data-drawn", what);
      memoryText(list);
    }
    function slotList(top) {
      return top.map(function (s) { return "#" + s[0] + " (" + pct(s[1]) + ")"; }).join(", ");
    }
    function memoryText(list) {
      if (!mem) { memBox.textContent = "This model has no memory."; return; }
      var parts = [];
      if (list.length === 1)
        parts.push("\u201c" + d.words[list[0]] + "\u201d reads memory slots " + slotList(mem.word_top[list[0]]) + ".");
      if (state.patch >= 0) {
        var v = Math.floor(state.patch / (h * w)) + 1;
        parts.push("Image region (view " + v + ") reads " + slotList(mem.patch_top[state.patch]) + "." +
                   (overlap ? " Words shaded by shared reading." : ""));
      } else {
        parts.push("Click an image region to see the slots it reads.");
      }
      memBox.textContent = parts.join(" ");
    }
    function shadeWords() {
      for (var i = 0; i < words.length; i++) {
        if (state.patch < 0 || !overlap) { words[i].style.backgroundColor = ""; continue; }
        var a = overlap[i * P + state.patch] / 255;
        words[i].style.backgroundColor = words[i].classList.contains("on") ? "" : "rgba(21,101,192," + (0.55 * a).toFixed(3) + ")";
      }
    }
    var pinned = { words: [], entity: -1 };
    function pick(list, entity) {
      state.words = list; state.entity = entity;
      pinned = { words: list, entity: entity };
      draw(); shadeWords();
    }
    function preview(list, entity) { state.words = list; state.entity = entity; draw(); shadeWords(); }
    function restore() { state.words = pinned.words; state.entity = pinned.entity; draw(); shadeWords(); }

    Array.prototype.forEach.call(words, function (el) {
      var i = parseInt(el.getAttribute("data-i"), 10);
      el.addEventListener("mouseenter", function () { preview([i], -1); });
      el.addEventListener("mouseleave", restore);
      el.addEventListener("click", function () { pick([i], -1); });
      el.addEventListener("keydown", function (ev) {
        if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); pick([i], -1); }
        if (ev.key === "ArrowRight" && i + 1 < T) { words[i + 1].focus(); pick([i + 1], -1); }
        if (ev.key === "ArrowLeft" && i > 0) { words[i - 1].focus(); pick([i - 1], -1); }
      });
    });
    Array.prototype.forEach.call(chips, function (el) {
      var k = parseInt(el.getAttribute("data-entity"), 10);
      el.addEventListener("click", function () { pick(d.entities[k].words, k); });
      el.addEventListener("mouseenter", function () { preview(d.entities[k].words, k); });
      el.addEventListener("mouseleave", restore);
    });
    Array.prototype.forEach.call(stages, function (stage) {
      var v = parseInt(stage.getAttribute("data-view"), 10);
      stage.addEventListener("click", function (ev) {
        var box = stage.getBoundingClientRect();
        var col = Math.min(w - 1, Math.floor((ev.clientX - box.left) / box.width * w));
        var row = Math.min(h - 1, Math.floor((ev.clientY - box.top) / box.height * h));
        var p = v * h * w + row * w + col;
        state.patch = state.patch === p ? -1 : p;
        draw(); shadeWords();
      });
    });
    Array.prototype.forEach.call(section.querySelectorAll("input[type=radio]"), function (r) {
      r.addEventListener("change", function () { draw(); });
    });
    layerSel.addEventListener("change", function () { draw(); });

    // Start on the first positive finding phrase, else the first word, so the page opens with a map.
    var first = -1;
    for (var k = 0; k < d.entities.length; k++) if (d.entities[k].label === 1) { first = k; break; }
    if (first >= 0) pick(d.entities[first].words, first);
    else if (T) pick([0], -1);
    else draw();
  }

  var sections = document.querySelectorAll("section.study");
  for (var i = 0; i < sections.length; i++) Study(sections[i]);
  document.body.setAttribute("data-ready", "1");
})();
