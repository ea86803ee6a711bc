// Animus Datalab UI: live run state and logs. Loaded from our own origin; no inline script.
(function () {
  "use strict";
  var TERMINAL = { succeeded: true, failed: true, canceled: true };

  function followLog(pre) {
    var offset = parseInt(pre.getAttribute("data-offset"), 10) || 0;
    var state = pre.getAttribute("data-state");
    if (TERMINAL[state]) return;
    var url = pre.getAttribute("data-live-log");
    function poll() {
      fetch(url + "?offset=" + offset, { credentials: "same-origin", cache: "no-store" })
        .then(function (response) {
          if (!response.ok) throw new Error("HTTP " + response.status);
          var next = parseInt(response.headers.get("X-Log-Offset"), 10);
          var now = response.headers.get("X-Run-State");
          return response.text().then(function (text) {
            if (text) {
              var atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
              pre.appendChild(document.createTextNode(text));
              if (atEnd) pre.scrollTop = pre.scrollHeight;
            }
            if (!isNaN(next)) offset = next;
            var label = document.querySelector("[data-live-state]");
            if (label && now) label.textContent = now;
            if (now && now !== state) {
              // A new state brings new parts of the page (snapshot, metrics, artifacts).
              window.location.reload();
              return;
            }
            window.setTimeout(poll, 1500);
          });
        })
        .catch(function () { window.setTimeout(poll, 5000); });
    }
    window.setTimeout(poll, 1000);
  }

  function followStates(table) {
    var rows = table.querySelectorAll("tr[data-run]");
    var open = [];
    rows.forEach(function (row) {
      var cell = row.querySelector("[data-state]");
      if (cell && !TERMINAL[cell.getAttribute("data-state")]) open.push(row.getAttribute("data-run"));
    });
    if (!open.length) return;
    var url = table.getAttribute("data-live-states") + "?ids=" + open.join(",");
    function poll() {
      fetch(url, { credentials: "same-origin", cache: "no-store" })
        .then(function (response) { return response.json(); })
        .then(function (states) {
          var pending = 0;
          rows.forEach(function (row) {
            var state = states[row.getAttribute("data-run")];
            var cell = row.querySelector("[data-state]");
            if (state && cell) {
              cell.textContent = state;
              cell.setAttribute("data-state", state);
              cell.className = "state " + state;
              if (!TERMINAL[state]) pending += 1;
            }
          });
          if (pending) window.setTimeout(poll, 2000);
        })
        .catch(function () { window.setTimeout(poll, 5000); });
    }
    window.setTimeout(poll, 2000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("pre[data-live-log]").forEach(followLog);
    document.querySelectorAll("table[data-live-states]").forEach(followStates);
  });
})();
