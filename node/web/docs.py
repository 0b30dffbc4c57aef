"""`/docs`: the API described on one plain page, built on the node from its own OpenAPI.

quart-schema's documentation pages (Swagger UI, ReDoc, Scalar) load their scripts and styles
from CDNs, and none of them is installed with the node: a page that fetches code from a
third party at every visit is what the node's Content-Security-Policy forbids. This page has
no script at all: each operation with its method, path, token, summary, request and
responses, and a link to `/openapi.json` for tools.
"""

from __future__ import annotations

from html import escape
from typing import Any

_METHODS = ("get", "post", "put", "patch", "delete")


def _schema_name(content: dict[str, Any] | None) -> str:
    schema = ((content or {}).get("application/json") or {}).get("schema") or {}
    ref = schema.get("$ref", "")
    return ref.rsplit("/", 1)[-1] if ref else str(schema.get("type", ""))


def docs_page(spec: dict[str, Any], openapi_path: str = "/openapi.json") -> str:
    info = spec.get("info", {})
    title = escape(f"{info.get('title', 'API')} {info.get('version', '')}".strip())
    rows = []
    for path, operations in sorted(spec.get("paths", {}).items()):
        for method in _METHODS:
            operation = operations.get(method)
            if operation is None:
                continue
            summary = operation.get("summary") or operation.get("description") or ""
            token = "bearer token" if operation.get("security") else ""
            body = _schema_name((operation.get("requestBody") or {}).get("content"))
            responses = ", ".join(
                f"{code} {_schema_name(reply.get('content'))}".strip()
                for code, reply in sorted(operation.get("responses", {}).items())
            )
            rows.append(
                "<tr>"
                f"<td><code>{escape(method.upper())}</code></td>"
                f"<td><code>{escape(path)}</code></td>"
                f"<td>{escape(token)}</td>"
                f"<td>{escape(summary.strip().splitlines()[0] if summary.strip() else '')}</td>"
                f"<td>{escape(body)}</td>"
                f"<td>{escape(responses)}</td>"
                "</tr>"
            )
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title>"
        '<link rel="stylesheet" href="/static/docs.css"></head><body>'
        f"<h1>{title}</h1>"
        f'<p>The machine-readable description: <a href="{escape(openapi_path)}">'
        f"{escape(openapi_path)}</a> (OpenAPI {escape(str(spec.get('openapi', '')))}).</p>"
        "<table><thead><tr><th>method</th><th>path</th><th>token</th><th>what</th>"
        "<th>request</th><th>responses</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></body></html>\n"
    )
