  // Shared by dashboard.html and circuit.html (put in by saelab.interpret.dashboard.fill_page).
  // Record script errors where a test (or a curious user) can read them.
  var root = document.documentElement;
  root.setAttribute("data-errors", "");
  window.addEventListener("error", function (e) {
    root.setAttribute("data-errors", root.getAttribute("data-errors") + (e.message || "error") + "\n");
  });
  function readJSON(id) { var e = document.getElementById(id); return e ? JSON.parse(e.textContent) : null; }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);  // text only, never HTML
    return e;
  }
  function svg(tag, attrs) {
    var e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "\u2013";
    if (v === 0) return "0";
    var a = Math.abs(v);
    if (a >= 1e4 || a < 1e-3) return v.toExponential(2);
    return v.toPrecision(4).replace(/\.?0+$/, "");
  }
  // make whitespace visible without touching the text otherwise
  function tokText(t) { return String(t).replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); }
  function has(o, k) { return Object.prototype.hasOwnProperty.call(o, k); }
