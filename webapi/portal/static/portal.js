// callbridge pages: live updates of calls in progress. Everything else works without this script.
// A page whose <section id="live" data-live="1"> holds calls in progress is fetched again every
// second and that section replaced by the fresh one, until the server marks it data-live="0".
(function () {
  "use strict";
  var INTERVAL = 1000;
  var failures = 0;

  function region() { return document.getElementById("live"); }

  function schedule() {
    var delay = INTERVAL * Math.min(10, Math.pow(2, failures));
    window.setTimeout(poll, delay);
  }

  function poll() {
    var current = region();
    if (!current || current.getAttribute("data-live") !== "1") { return; }
    if (document.visibilityState === "hidden") { schedule(); return; }
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Callbridge-Live": "1" }, cache: "no-store" })
      .then(function (response) {
        if (!response.ok || response.redirected) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("live");
        var old = region();
        if (fresh && old) { old.replaceWith(document.importNode(fresh, true)); }
        failures = 0;
        document.documentElement.setAttribute("data-live-updates", String(Number(document.documentElement.getAttribute("data-live-updates") || "0") + 1));
        schedule();
      })
      .catch(function () { failures += 1; schedule(); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var current = region();
    if (current && current.getAttribute("data-live") === "1") { schedule(); }
  });
})();
