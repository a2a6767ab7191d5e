// A small offline reader of /openapi.json (FastAPI's Swagger page would load its scripts from a CDN).
"use strict";

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function operation(path, method, spec) {
  const box = element("section", undefined, "op");
  const title = element("h2");
  title.append(element("span", method, "method"), element("code", path));
  box.append(title);
  if (spec.summary) box.append(element("p", spec.summary));
  if (spec.description) box.append(element("p", spec.description));
  if (spec.parameters && spec.parameters.length) {
    const table = element("table");
    table.append(element("tr"));
    table.rows[0].append(element("th", "parameter"), element("th", "in"), element("th", "description"));
    for (const p of spec.parameters) {
      const row = element("tr");
      row.append(element("td", p.name), element("td", p.in), element("td", p.description || ""));
      table.append(row);
    }
    box.append(table);
  }
  if (spec.requestBody) {
    const types = Object.keys(spec.requestBody.content || {}).join(", ");
    box.append(element("p", `Body (${types}): ${spec.requestBody.description || ""}`));
  }
  const codes = Object.entries(spec.responses || {}).map(([code, r]) => `${code} ${r.description || ""}`);
  box.append(element("p", `Responses: ${codes.join("; ")}`));
  return box;
}

fetch("/openapi.json")
  .then((response) => response.json())
  .then((api) => {
    const ops = document.getElementById("ops");
    ops.replaceChildren(element("p", `${api.info.title} ${api.info.version}: ${api.info.description || ""}`));
    for (const [path, methods] of Object.entries(api.paths)) {
      for (const [method, spec] of Object.entries(methods)) ops.append(operation(path, method, spec));
    }
  })
  .catch((error) => { document.getElementById("ops").textContent = `cannot read /openapi.json: ${error}`; });
