"""Schemathesis hooks for the conformance test in tests/test_http.py (SCHEMATHESIS_HOOKS).

One check replaces schemathesis' `positive_data_acceptance`: the schema accepts any feature string
(an SAE index, a vector, or a free-text concept, resolved by the engine), so a schema-valid request
may still name a feature that does not exist, and JSON Schema cannot say "one entry per feature".
Those 400s are allowed only when the server marks them so (`code: unresolved_feature` or
`duplicate_feature`); any other rejection of schema-valid data still fails.
"""

from __future__ import annotations

import json

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance


@schemathesis.check
def positive_data_accepted_unless_feature_unresolved(ctx, response, case):
    if response.status_code == 400:
        try:
            error = json.loads(response.content)["error"]
        except (ValueError, KeyError, TypeError):
            error = {}
        if isinstance(error, dict) and error.get("code") in ("unresolved_feature", "duplicate_feature"):
            return None
    return positive_data_acceptance(ctx, response, case)
