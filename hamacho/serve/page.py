"""The one HTML page of ``hamacho serve``: pick a model, drop an image, see the verdict."""

from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>hamacho inspection</title>
<style>
 body { font: 16px/1.4 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
        color: #222; }
 #drop { border: 2px dashed #888; border-radius: 8px; padding: 2rem; text-align: center;
         margin: 1rem 0; cursor: pointer; }
 #drop.over { background: #eef5ff; border-color: #2b7bba; }
 #verdict { font-size: 1.6rem; font-weight: bold; }
 .anomalous { color: #d7301f; } .good { color: #1a7f37; } .unknown { color: #666; }
 #error { color: #d7301f; white-space: pre-wrap; }
 img { max-width: 100%; margin-top: 1rem; }
 label { margin-right: 1rem; }
</style>
</head>
<body>
<h1>hamacho inspection</h1>
<p>
 <label>Model <select id="model"></select></label>
 <label>API key <input id="key" type="password" autocomplete="off" placeholder="if required">
 </label>
</p>
<div id="drop">Drop an image here, or <label>choose one
 <input id="file" type="file" accept="image/*"></label></div>
<p id="status" aria-live="polite"></p>
<p id="verdict" aria-live="polite"></p>
<p id="score"></p>
<p id="error" role="alert"></p>
<img id="overlay" alt="heat-map overlay: input | heat map | predicted region" hidden>
<script>
const $ = (id) => document.getElementById(id);
const headers = () => ($("key").value ? {"X-API-Key": $("key").value} : {});
async function loadModels() {
  $("error").textContent = "";
  const response = await fetch("v1/models", {headers: headers()});
  const body = await response.json();
  if (!response.ok) { $("error").textContent = body.error; return; }
  $("model").replaceChildren(...body.map((m) => {
    const option = document.createElement("option");
    option.value = m.name;
    option.textContent = `${m.name} (${m.model}, threshold ${m.threshold ?? "none"})`;
    return option;
  }));
}
async function inspect(file) {
  for (const id of ["verdict", "score", "error"]) $(id).textContent = "";
  $("overlay").hidden = true;
  $("status").textContent = `Inspecting ${file.name}...`;
  const form = new FormData();
  form.append("file", file, file.name);
  const model = encodeURIComponent($("model").value);
  const response = await fetch(`v1/models/${model}/predict?maps=true`,
                               {method: "POST", body: form, headers: headers()});
  const body = await response.json();
  $("status").textContent = "";
  if (!response.ok) { $("error").textContent = `${response.status}: ${body.error}`; return; }
  const r = body.results[0];
  const verdict = r.is_anomalous === null ? "no verdict (no threshold)"
                : r.is_anomalous ? "ANOMALOUS" : "GOOD";
  $("verdict").textContent = verdict;
  $("verdict").className = r.is_anomalous === null ? "unknown"
                         : r.is_anomalous ? "anomalous" : "good";
  $("score").textContent = `${r.filename}: score ${r.score} (threshold ${r.threshold ?? "none"})`;
  $("overlay").src = `data:image/png;base64,${r.map_png}`;
  $("overlay").hidden = false;
}
$("file").addEventListener("change", () => $("file").files[0] && inspect($("file").files[0]));
$("key").addEventListener("change", loadModels);
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) inspect(e.dataTransfer.files[0]);
});
loadModels();
</script>
</body>
</html>
"""
