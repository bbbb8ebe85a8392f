"""GET /studio serves the Studio's static files (the browser behaviour is in test_studio_browser.py)."""
from __future__ import annotations

import pytest

from handlers.routes_studio import FILES, STATIC_DIR
from tests.api_support import KEY, make_api


@pytest.fixture
def api(settings):
    return make_api(settings, api_key=KEY)


def test_the_page_is_served_without_the_key_and_with_a_strict_policy(api):
    """The files hold no data; the page asks for the key itself. Relative redirect: works under a prefix."""
    r = api.client.get("/studio", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "studio/"
    page = api.client.get("/studio/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>ACE-Step Studio</title>" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "object-src 'none'" in csp and "unsafe-eval" not in csp
    script = api.client.get("/studio/studio.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert api.client.get("/v1/models").status_code == 401  # the API itself stays behind the key


def test_every_script_the_page_loads_is_served_and_the_vendored_licence_ships(api):
    page = api.client.get("/studio/").text
    for name in ("studio.js", "studio.css", "vendor/wavesurfer.min.js", "vendor/wavesurfer.regions.min.js"):
        assert f'"{name}"' in page
        assert api.client.get(f"/studio/{name}").status_code == 200, name
    assert "BSD 3-Clause" in (STATIC_DIR / "vendor" / "LICENSE.wavesurfer.txt").read_text()


@pytest.mark.parametrize("path", ["/studio/nope.js", "/studio/../handlers/app.py", "/studio/%2e%2e/app.py",
                                  "/studio/vendor/README.md"])
def test_only_the_studio_files_are_served(api, path):
    assert api.client.get(path).status_code == 404
    assert all(not name.endswith(".py") for name in FILES)


def test_the_page_sets_untrusted_text_with_textcontent_only():
    """The escaping rule, checked on the source: no innerHTML/outerHTML/insertAdjacentHTML/document.write."""
    source = (STATIC_DIR / "studio.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in source, sink
