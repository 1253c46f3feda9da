// Starts the vendored Redoc on /docs (a file, not an inline script, so the page's CSP can forbid those).
(function () {
  var el = document.getElementById("redoc");
  window.Redoc.init(el.getAttribute("data-spec-url"), { hideDownloadButton: false }, el);
})();
