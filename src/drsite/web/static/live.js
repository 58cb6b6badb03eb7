/* drsite dashboard: keep keyboard focus (and text typed in a field) across the live refreshes.
   Every 2 s htmx swaps a page's live region for a fresh render; the element that had the focus
   is replaced by its twin in the new HTML. Before a swap we note how to find that twin (its
   id, else its href or name, within the live region); after the swap we focus it again,
   without scrolling. No inline script: this file is served from /ui/static (CSP 'self'). */
(function () {
  "use strict";
  var saved = null;

  function keyOf(el) {
    if (!el || el === document.body) { return null; }
    if (el.id) { return { sel: "#" + CSS.escape(el.id) }; }
    var tag = el.tagName.toLowerCase();
    var href = el.getAttribute("href");
    if (href) { return { sel: tag + '[href="' + CSS.escape(href) + '"]' }; }
    var name = el.getAttribute("name");
    if (name) {
      var value = el.getAttribute("value");
      return { sel: tag + '[name="' + CSS.escape(name) + '"]' +
               (value !== null && el.type !== "text" ? '[value="' + CSS.escape(value) + '"]' : "") };
    }
    return null;
  }

  document.addEventListener("htmx:beforeSwap", function (ev) {
    var target = ev.detail.target;
    var active = document.activeElement;
    saved = null;
    if (target && active && target.contains(active)) {
      var key = keyOf(active);
      if (key) {
        key.target = target;
        if (typeof active.selectionStart === "number") {
          key.value = active.value; key.start = active.selectionStart; key.end = active.selectionEnd;
        }
        saved = key;
      }
    }
  });

  document.addEventListener("htmx:afterSwap", function (ev) {
    if (!saved || ev.detail.target !== saved.target) { return; }
    var el = saved.target.querySelector(saved.sel);
    if (el) {
      if (saved.value !== undefined && "value" in el) {
        el.value = saved.value;
        try { el.setSelectionRange(saved.start, saved.end); } catch (e) { /* not a text field */ }
      }
      el.focus({ preventScroll: true });
    }
    saved = null;
  });
})();
