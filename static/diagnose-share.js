/*
 * diagnose-share.js: the "share" box of /diagnose. Once the page has its verdict (window.__diagnosis),
 * the person can copy it as JSON or send it to the gateway's operator (POST /diagnose/reports).
 */
(function () {
  "use strict";

  var box;
  var copyButton;
  var sendButton;
  var result;
  var sentFor = null; // the diagnosis already sent: one report per run

  function init() {
    box = document.getElementById("diagnose-share");
    if (!box) {
      box = document.createElement("div");
      box.id = "diagnose-share";
      document.body.appendChild(box);
    }
    box.textContent = "";
    var title = document.createElement("h2");
    title.textContent = "Share this result";
    var hint = document.createElement("p");
    hint.textContent = "Send it to whoever runs this gateway, so they can see which connections get through " +
      "from networks like yours. It contains the results above, your browser's name and your address as the " +
      "gateway saw it.";
    copyButton = button("Copy report as JSON", "diagnose-copy", copy);
    sendButton = button("Send to the gateway operator", "diagnose-send", send);
    result = document.createElement("p");
    result.id = "diagnose-share-result";
    result.setAttribute("role", "status");
    box.appendChild(title);
    box.appendChild(hint);
    box.appendChild(copyButton);
    box.appendChild(document.createTextNode(" "));
    box.appendChild(sendButton);
    box.appendChild(result);
    refresh();
    // The verdict appears when the probes finish (the page also says so with a "diagnosis" event).
    document.addEventListener("diagnosis", refresh);
    setInterval(refresh, 300);
  }

  function button(label, id, onClick) {
    var b = document.createElement("button");
    b.type = "button";
    b.id = id;
    b.textContent = label;
    b.addEventListener("click", onClick);
    return b;
  }

  function diagnosis() {
    var d = window.__diagnosis;
    return d && typeof d === "object" && d.transports ? d : null;
  }

  function refresh() {
    var d = diagnosis();
    copyButton.disabled = !d;
    sendButton.disabled = !d || d === sentFor;
    if (!d && !result.textContent) show("Available when the diagnosis has finished.", "pending");
    else if (d && result.dataset.kind === "pending") show("", "");
  }

  function show(text, kind) {
    result.textContent = text;
    result.dataset.kind = kind;
    result.style.color = kind === "error" ? "#8a1c1c" : kind === "ok" ? "#1d5e2a" : "#555";
  }

  function copy() {
    var d = diagnosis();
    if (!d) return;
    var text = JSON.stringify(d, null, 2);
    var done = function () { show("Copied the report to the clipboard (" + text.length + " characters).", "ok"); };
    if (navigator.clipboard && navigator.clipboard.writeText) {
      navigator.clipboard.writeText(text).then(done, function () { legacyCopy(text) ? done() : manual(text); });
    } else if (legacyCopy(text)) {
      done();
    } else {
      manual(text);
    }
  }

  // Pages served over plain HTTP on a real host have no navigator.clipboard.
  function legacyCopy(text) {
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    var ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    document.body.removeChild(area);
    return ok;
  }

  function manual(text) {
    show("This browser did not allow copying; select the text below and copy it.", "error");
    var area = document.createElement("textarea");
    area.value = text;
    area.rows = 12;
    area.style.width = "100%";
    box.appendChild(area);
    area.select();
  }

  function send() {
    var d = diagnosis();
    if (!d) return;
    sendButton.disabled = true;
    show("Sending\u2026", "wait");
    fetch("/diagnose/reports", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(d)
    }).then(function (resp) {
      return resp.text().then(function (text) {
        var body = null;
        try { body = JSON.parse(text); } catch (e) { /* a proxy's HTML error page */ }
        if (resp.ok) {
          sentFor = d;
          show("Sent. Thank you: the gateway's operator can now see this report.", "ok");
        } else {
          sendButton.disabled = false;
          var detail = body && body.detail ? body.detail : "HTTP " + resp.status;
          show("Could not send the report: " + detail, "error");
        }
      });
    }).catch(function (e) {
      sendButton.disabled = false;
      show("Could not reach the gateway to send the report (" + (e && e.message) + "). Copy it instead.", "error");
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
