// The dashboard's only script: swap in the live fragment every refresh period, ask before an
// action, search as one types. No library, no build step; the page works without it too (a
// reload shows fresh figures; actions then confirm on a page of their own).
(function () {
  "use strict";
  var live = document.getElementById("live");
  var status = document.getElementById("status");
  var search = document.getElementById("search");
  if (!live || !status) { return; }
  var period = Number(status.getAttribute("data-refresh-ms")) || 1500;
  var busy = false;
  var lastOk = Date.now();
  var lastHtml = null;

  function refresh() {
    if (busy || document.hidden) { return; }
    busy = true;
    fetch("/dashboard/live" + window.location.search, {
      credentials: "same-origin",
      headers: { "Accept": "text/html" },
      redirect: "manual"
    }).then(function (response) {
      if (response.type === "opaqueredirect" || response.status === 401) {
        window.location.href = "/login";  // the session ended: sign in again
        return null;
      }
      if (!response.ok) { throw new Error("HTTP " + response.status); }
      return response.text();
    }).then(function (html) {
      if (html === null) { return; }
      // Unchanged figures leave the page alone: no flicker, and a button under the pointer stays.
      if (html !== lastHtml) { live.innerHTML = html; lastHtml = html; }
      lastOk = Date.now();
      status.textContent = "live";
      status.classList.remove("stale");
    }).catch(function () {
      var seconds = Math.round((Date.now() - lastOk) / 1000);
      status.textContent = "no answer for " + seconds + " s";
      status.classList.add("stale");
    }).then(function () { busy = false; });
  }
  window.setInterval(refresh, period);

  // Every action asks first; the confirmed form says so, and the server then skips its own page.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute && form.getAttribute("data-confirm");
    if (!question) { return; }
    if (!window.confirm(question)) { event.preventDefault(); return; }
    // The live fragment is shared by every page: the session's CSRF token comes from the page.
    if (form.elements.csrf && !form.elements.csrf.value) {
      form.elements.csrf.value = live.getAttribute("data-csrf") || "";
    }
    var confirmed = document.createElement("input");
    confirmed.type = "hidden"; confirmed.name = "confirmed"; confirmed.value = "yes";
    form.appendChild(confirmed);
  });

  // Search as one types: the address keeps the query, so a reload or a shared link shows it.
  if (search) {
    var input = search.querySelector("input[name=q]");
    var timer = null;
    input.addEventListener("input", function () {
      window.clearTimeout(timer);
      timer = window.setTimeout(function () {
        var params = new URLSearchParams(window.location.search);
        params.set("q", input.value);
        params.delete("page");
        window.history.replaceState(null, "", "?" + params.toString());
        refresh();
      }, 250);
    });
  }
})();
