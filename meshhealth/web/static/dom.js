// MHDom: the table helpers every page uses. Values always go in as text, never markup.
(function () {
  "use strict";

  // Append a cell holding `text` (a tooltip `tip` and a class `cls` if given).
  function td(tr, text, cls, tip) {
    const c = document.createElement("td");
    c.textContent = String(text);
    if (cls) c.className = cls;
    if (tip) c.title = tip;
    tr.appendChild(c);
    return c;
  }

  // Replace the table's body with one row per item, each filled in by draw(tr, item).
  function fillTable(table, rows, draw) {
    table.tBodies[0].replaceChildren(...rows.map((row) => {
      const tr = document.createElement("tr");
      draw(tr, row);
      return tr;
    }));
  }

  window.MHDom = { td, fillTable };
})();
