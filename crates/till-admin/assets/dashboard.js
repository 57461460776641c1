// Till dashboard: live updates and the copy button. Hand-written, no dependencies.
// Pages work without it: every view is rendered on the server.
//
// Live: listen to the admin event stream (the session cookie authenticates it) and, when
// something happens, re-fetch this page and swap its [data-live] regions, at most about
// three times a second. The server stays the only renderer.
(function () {
  "use strict";

  function copyButton() {
    var btn = document.getElementById("copy-key");
    if (!btn) return;
    btn.addEventListener("click", function () {
      var field = document.getElementById(btn.getAttribute("data-copy"));
      var status = document.getElementById("copy-status");
      if (!field) return;
      field.focus();
      field.select();
      var done = function (ok) {
        if (status) status.textContent = ok ? "Copied." : "Selected: press Ctrl+C to copy.";
      };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(field.value).then(function () { done(true); }, function () { done(false); });
      } else {
        var ok = false;
        try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
        done(ok);
      }
    });
  }

  function live() {
    var regions = document.querySelectorAll("[data-live]");
    var status = document.getElementById("live-status");
    if (!regions.length || !window.EventSource || !window.fetch || !window.DOMParser) return;
    var family = regions[0].getAttribute("data-family");
    var feed = document.getElementById("feed");
    // Re-fetch at most every `gap` ms: 300 ms, or four times what the last refresh took
    // (a big overview on a busy server backs off by itself).
    var timer = null, busy = false, again = false, gap = 300, last = 0;

    function setStatus(text, on) {
      if (!status) return;
      status.textContent = text;
      status.classList.toggle("on", !!on);
    }

    function refresh() {
      if (busy) { again = true; return; }
      busy = true;
      var started = Date.now();
      fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (text) {
          if (text === null) return;
          var doc = new DOMParser().parseFromString(text, "text/html");
          document.querySelectorAll("[data-live]").forEach(function (el) {
            var fresh = el.id && doc.getElementById(el.id);
            if (!fresh) return;
            // Keep keyboard focus on the same link or button if it is still there.
            var active = document.activeElement;
            var key = active && el.contains(active) ? active.getAttribute("href") : null;
            el.replaceWith(document.importNode(fresh, true));
            if (key) {
              var refocus = document.querySelector('[data-live] [href="' + CSS.escape(key) + '"]');
              if (refocus) refocus.focus();
            }
          });
        })
        .catch(function () { /* the next event retries */ })
        .then(function () {
          last = Date.now();
          gap = Math.min(10000, Math.max(300, (last - started) * 4));
          busy = false;
          if (again) { again = false; schedule(); }
        });
    }

    function schedule() {
      if (timer) return;
      var wait = Math.max(50, last + gap - Date.now());
      timer = setTimeout(function () { timer = null; refresh(); }, wait);
    }

    function note(type, data) {
      if (!feed) return;
      var e = {};
      try { e = JSON.parse(data); } catch (x) { e = {}; }
      var a = e.alert || {};
      var at = new Date(((e.at || a.at || 0) * 1000)).toISOString().slice(11, 19);
      var text = at + "  " + type;
      if (type === "claim") text += "  #" + e.seq + " " + e.method + " /" + e.upstream + e.path + (e.remaining !== undefined ? "  (" + e.remaining + " left)" : "");
      if (type === "refusal") text += "  " + e.status + " " + e.code;
      if (type === "revocation") text += "  " + String(e.revocation_id || "").slice(0, 12) + "…";
      if (type === "alert") text += "  " + (a.kind || "") + (a.threshold ? " " + a.threshold + " %" : "") + (a.label ? "  " + a.label : "");
      var li = document.createElement("li");
      li.textContent = text;
      feed.insertBefore(li, feed.firstChild);
      while (feed.children.length > 50) feed.removeChild(feed.lastChild);
      if (feed.parentElement) feed.parentElement.hidden = false;
    }

    var url = "/admin/v1/events" + (family ? "?family=" + encodeURIComponent(family) : "");
    var source = new EventSource(url);
    source.onopen = function () { setStatus("live", true); };
    source.onerror = function () { setStatus("reconnecting…", false); };
    ["claim", "refusal", "revocation", "alert"].forEach(function (type) {
      source.addEventListener(type, function (ev) { note(type, ev.data); schedule(); });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    copyButton();
    live();
  });
})();
