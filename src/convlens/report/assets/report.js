(function () {
  "use strict";
  var table = document.getElementById("unit-table");
  if (!table) { return; }
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var heads = table.tHead.rows[0].cells;
  function key(row, index, numeric) {
    var cell = row.cells[index];
    var value = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent;
    if (!numeric) { return value.trim().toLowerCase(); }
    var number = parseFloat(value);
    return isNaN(number) ? null : number;
  }
  Array.prototype.forEach.call(heads, function (head, index) {
    var button = head.querySelector("button");
    if (!button) { return; }
    button.addEventListener("click", function () {
      var numeric = head.getAttribute("data-type") === "number";
      var current = head.getAttribute("aria-sort");
      // the first click puts the largest numbers (and text from A, and rank 1) on top; the next click reverses
      var ascending = current ? current !== "ascending" : (!numeric || head.getAttribute("data-first") === "ascending");
      Array.prototype.forEach.call(heads, function (other) { other.removeAttribute("aria-sort"); });
      head.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var keyed = rows.map(function (row, position) { return [key(row, index, numeric), position, row]; });
      keyed.sort(function (a, b) {
        if (a[0] === null || b[0] === null) {
          if (a[0] === b[0]) { return a[1] - b[1]; }
          return a[0] === null ? 1 : -1;
        }
        if (a[0] < b[0]) { return ascending ? -1 : 1; }
        if (a[0] > b[0]) { return ascending ? 1 : -1; }
        return a[1] - b[1];
      });
      keyed.forEach(function (item) { body.appendChild(item[2]); });
    });
  });
  var text = document.getElementById("unit-filter");
  var dead = document.getElementById("hide-dead");
  var group = document.getElementById("group-filter");
  var visualised = document.getElementById("visualised-only");
  var count = document.getElementById("unit-count");
  function apply() {
    var words = text.value.trim().toLowerCase().split(/\s+/).filter(function (w) { return w.length > 0; });
    var shown = 0;
    rows.forEach(function (row) {
      var haystack = row.getAttribute("data-search");
      var visible = (!dead.checked || row.getAttribute("data-dead") !== "true") &&
        (!visualised.checked || row.getAttribute("data-visualised") === "true") &&
        (group.value === "" || row.getAttribute("data-group") === group.value) &&
        words.every(function (word) { return haystack.indexOf(word) !== -1; });
      row.hidden = !visible;
      if (visible) { shown += 1; }
    });
    count.textContent = shown + " of " + rows.length + " shown";
  }
  [text, dead, group, visualised].forEach(function (control) {
    control.addEventListener("input", apply);
    control.addEventListener("change", apply);
  });
  apply();
}());
