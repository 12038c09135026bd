"""/docs (Swagger UI) and /redoc (ReDoc), from files installed with the package: no CDN.

FastAPI's own pages load their scripts and styles from a CDN, and are blank where the API is
reached without the internet. The `fastapi-offline` package ships Swagger UI's bundle and CSS and
ReDoc's standalone bundle; they are served from ASSETS on this API, and the pages point there
(under the app's root path, behind a proxy that mounts it under one).
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from producer.api.app import root

# Where the installed files are served: swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon.png
ASSETS = "/docs/assets"

router = APIRouter(include_in_schema=False)


def install(app: FastAPI) -> None:
    """The pages and their files (the app made with docs_url=None, redoc_url=None)."""
    app.mount(ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-assets")
    app.include_router(router)


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    from fastapi.openapi.docs import get_swagger_ui_html

    prefix, app = root(request), request.app
    return get_swagger_ui_html(openapi_url=f"{prefix}{app.openapi_url}", title=f"{app.title} - Swagger UI",
                               swagger_js_url=f"{prefix}{ASSETS}/swagger-ui-bundle.js",
                               swagger_css_url=f"{prefix}{ASSETS}/swagger-ui.css",
                               swagger_favicon_url=f"{prefix}{ASSETS}/favicon.png",
                               # no validator badge: it is an image from swagger.io
                               swagger_ui_parameters={"validatorUrl": None, **(app.swagger_ui_parameters or {})})


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    from fastapi.openapi.docs import get_redoc_html

    prefix, app = root(request), request.app
    return get_redoc_html(openapi_url=f"{prefix}{app.openapi_url}", title=f"{app.title} - ReDoc",
                          redoc_js_url=f"{prefix}{ASSETS}/redoc.standalone.js",
                          redoc_favicon_url=f"{prefix}{ASSETS}/favicon.png", with_google_fonts=False)
