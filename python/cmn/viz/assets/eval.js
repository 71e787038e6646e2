// cmn-eval page: sort the study rows by a column (click again to reverse).
"use strict";
(function () {
  var body = document.querySelector("table.studies tbody");
  var buttons = document.querySelectorAll("th button[data-sort]");
  function sortBy(button) {
    var key = button.getAttribute("data-sort");
    var asc = !button.classList.contains("asc");
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.getAttribute("data-" + key), y = b.getAttribute("data-" + key);
      var c = key === "id" ? (x < y ? -1 : x > y ? 1 : 0) : parseFloat(x) - parseFloat(y);
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(buttons, function (b) { b.classList.remove("asc", "desc"); });
    button.classList.add(asc ? "asc" : "desc");
  }
  Array.prototype.forEach.call(buttons, function (b) {
    b.addEventListener("click", function () { sortBy(b); });
  });
  document.body.setAttribute("data-ready", "1");
})();
