"""docs/observability/: the example alert rules, the Prometheus scrape config, the Grafana
dashboard and its provisioning, and the compose profile that runs them. Docker cannot run here,
so these tests read the files: every expression refers only to series the gateway exposes (the
catalogue of common.metrics and the scrape-time gauges of llmrotate_site.metrics), with labels
those series have; promtool (`make promtool`, Debian's build) checks the rules, their unit
tests and the config; compose mounts the files that exist, where the configs look for them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "docs" / "observability"
ALERTS = ASSETS / "alerts.yml"
ALERTS_TEST = ASSETS / "alerts_test.yml"
PROMETHEUS = ASSETS / "prometheus.yml"
DASHBOARD = ASSETS / "grafana" / "llmrotate.json"
PROVISIONING = ASSETS / "grafana" / "provisioning"
# Without promtool these tests fail (make test installs it); this lets a laptop skip them.
ALLOW_NO_PROMTOOL = "LLMROTATE_ALLOW_NO_PROMTOOL"

# Prometheus adds these to every scraped series.
TARGET_LABELS = {"instance", "job"}

# Aggregations and functions; anything else called like a function is a typo.
PROMQL_FUNCTIONS = frozenset(
    """
    sum min max avg group stddev stdvar count count_values bottomk topk quantile
    abs absent absent_over_time ceil changes clamp clamp_max clamp_min day_of_month day_of_week
    day_of_year days_in_month delta deriv exp floor histogram_count histogram_sum
    histogram_fraction histogram_quantile holt_winters hour idelta increase irate label_join
    label_replace ln log2 log10 minute month predict_linear rate resets round scalar sgn sort
    sort_desc sqrt time timestamp vector year avg_over_time min_over_time max_over_time
    sum_over_time count_over_time quantile_over_time stddev_over_time stdvar_over_time
    last_over_time present_over_time
    """.split()  # noqa: SIM905
)
PROMQL_KEYWORDS = frozenset(
    "and or unless by without on ignoring group_left group_right bool offset inf nan".split()  # noqa: SIM905
)
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
SELECTOR = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)\s*\{([^{}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
IDENTIFIER = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(\s*\()?")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
# Grafana's variables, as they stand in a query: $name, ${name}, ${name:format}, [[name]].
GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")


@pytest.fixture(scope="module")
def catalogue() -> dict[str, set[str]]:
    """Every series name the gateway exposes, with its label names."""
    from common.metrics import instruments
    from llmrotate_site.metrics import SHARED_STATE_HELP

    names: dict[str, set[str]] = {}
    for instrument in instruments():
        labels = set(instrument.labels) | TARGET_LABELS
        if instrument.kind == "counter":
            names[f"{instrument.name}_total"] = labels
        elif instrument.kind == "histogram":
            names[f"{instrument.name}_bucket"] = labels | {"le"}
            names[f"{instrument.name}_sum"] = labels
            names[f"{instrument.name}_count"] = labels
        else:
            names[instrument.name] = labels
    for name, (_doc, labels) in SHARED_STATE_HELP.items():
        names[name] = set(labels) | TARGET_LABELS
    return names


@pytest.fixture(scope="module")
def label_values() -> dict[str, set[str]]:
    """The values an exact matcher may compare an enumerated label with."""
    from healthchecks.breaker import BreakerStatus
    from keys.health import KeyStatus
    from usage.models import Outcome

    return {
        "outcome": {o.value for o in Outcome},
        "status_class": {"1xx", "2xx", "3xx", "4xx", "5xx", "none"},
        "state": {s.value for s in KeyStatus} | {s.value for s in BreakerStatus},
        "type": {"prompt", "completion", "cached", "cache_write", "reasoning"},
        "kind": {"ping", "http"},
        "stream": {"true", "false"},
    }


def load_yaml(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict), path
    return loaded


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return found


def dashboard_exprs() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in panels(dashboard())
        for target in panel.get("targets", [])
    ]


def without_grafana_variables(expr: str) -> str:
    """The query Grafana sends: variables replaced by values of their kind."""
    ranges = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h"}
    for name, value in ranges.items():
        expr = expr.replace(name, value)
    return GRAFANA_VARIABLE.sub(".*", expr)


def promql_problems(
    expr: str, catalogue: dict[str, set[str]], label_values: dict[str, set[str]]
) -> list[str]:
    """What is wrong with one PromQL expression, short of parsing it: unbalanced brackets,
    unknown functions, series the gateway does not expose, labels those series lack, and label
    values an enumerated label never takes."""
    problems = []
    bare = STRING.sub('""', expr)
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    for char in bare:
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            problems.append(f"unbalanced {char!r}")
    if stack:
        problems.append(f"unclosed {''.join(stack)!r}")

    used_labels: set[str] = set()
    for name, matchers in SELECTOR.findall(expr):
        known = catalogue.get(name, set())
        for label, op, value in MATCHER.findall(matchers):
            used_labels.add(label)
            if known and "*" not in known and label not in known:
                problems.append(f"{name} has no label {label!r}")
            exact = op in ("=", "!=") and label in label_values and "$" not in value
            if exact and value not in label_values[label]:
                problems.append(f"{label}={value!r} never occurs")

    # What is left: functions (an identifier before a parenthesis), keywords, series names.
    for grouping in GROUPING.finditer(bare):
        used_labels |= {label.strip() for label in grouping[2].split(",") if label.strip()}
    skeleton = GROUPING.sub(" ", bare)
    skeleton = re.sub(r"\{[^{}]*\}|\[[^\[\]]*\]", "", skeleton)
    metrics = set()
    for name, call in IDENTIFIER.findall(skeleton):
        if call:
            if name not in PROMQL_FUNCTIONS:
                problems.append(f"unknown function {name}()")
        elif name not in PROMQL_KEYWORDS:
            metrics.add(name)
            if name not in catalogue:
                problems.append(f"unknown series {name}")
    if not metrics:
        problems.append("refers to no series")
    # A grouping label no series of the expression has yields one silent group.
    available = set().union(*(catalogue.get(m, {"*"}) for m in metrics)) if metrics else {"*"}
    if "*" not in available:
        problems.extend(f"no series here has label {label!r}" for label in used_labels - available)
    return problems


# --- The checker itself -----------------------------------------------------------------------


def test_the_expression_checker_catches_what_it_should(
    catalogue: dict[str, set[str]], label_values: dict[str, set[str]]
) -> None:
    good = (
        'sum by (route) (rate(llmrotate_requests_total{status_class="5xx"}[5m])) > 0.05 '
        "and max by (provider) (llmrotate_keys_available) == 0"
    )
    assert promql_problems(good, catalogue, label_values) == []
    bad = {
        "sum(rate(llmrotate_requests_total[5m])": "unclosed",
        "sum(rate(llmrotate_requests[5m]))": "unknown series llmrotate_requests",
        "rates(llmrotate_requests_total[5m])": "unknown function",
        'llmrotate_requests_total{provider="openai"}': "has no label 'provider'",
        'llmrotate_requests_total{outcome="ok"}': "never occurs",
        "sum by (provider) (llmrotate_requests_total)": "no series here has label",
        "vector(1)": "refers to no series",
    }
    for expr, problem in bad.items():
        assert any(problem in p for p in promql_problems(expr, catalogue, label_values)), expr


# --- Alert rules ------------------------------------------------------------------------------


def test_every_alert_rule_has_a_name_an_expression_a_severity_and_annotations() -> None:
    groups = load_yaml(ALERTS)["groups"]
    assert groups and all(group["name"] and group["rules"] for group in groups)
    names = []
    for rule in alert_rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        names.append(rule["alert"])
        assert rule["expr"].strip(), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
    assert len(names) == len(set(names)), "alert names are unique"


def test_the_alerts_the_issue_asks_for_are_there() -> None:
    exprs = " ".join(rule["expr"] for rule in alert_rules())
    for series in (
        "max by (provider) (llmrotate_keys_available) == 0",  # all keys of a provider gone
        'llmrotate_circuit_breaker_state{state="open"}',
        "llmrotate_recorder_queue_depth",
        "llmrotate_recorder_write_failures_total",
        "llmrotate_recorder_records_dropped_total",
        'llmrotate_requests_total{status_class="5xx"}',
        "time() - max(llmrotate_probe_last_success_timestamp_seconds)",  # a dead beat
    ):
        assert series in exprs, series


def test_alert_expressions_refer_only_to_series_the_gateway_exposes(
    catalogue: dict[str, set[str]], label_values: dict[str, set[str]]
) -> None:
    problems = {
        rule["alert"]: found
        for rule in alert_rules()
        if (found := promql_problems(rule["expr"], catalogue, label_values))
    }
    assert problems == {}


def promtool() -> str:
    found = REPO / ".tools" / "bin" / "promtool"
    path = str(found) if found.exists() else shutil.which("promtool")
    if path is None:
        if os.environ.get(ALLOW_NO_PROMTOOL):
            pytest.skip(f"promtool not installed ({ALLOW_NO_PROMTOOL} is set)")
        pytest.fail(f"promtool not found: `make promtool`, or set {ALLOW_NO_PROMTOOL}=1")
    return path


def run_promtool(*args: str, cwd: Path = ASSETS) -> str:
    done = subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_promtool_accepts_the_alert_rules() -> None:
    out = run_promtool("check", "rules", str(ALERTS))
    assert f"SUCCESS: {len(alert_rules())} rules found" in out


def test_promtool_accepts_the_scrape_config(tmp_path: Path) -> None:
    """Checked as Prometheus loads it in compose: the rule file next to it, the token file in
    place (promtool refuses a config whose credentials file is missing)."""
    config = load_yaml(PROMETHEUS)
    token_file = config["scrape_configs"][0]["authorization"]["credentials_file"]
    token = tmp_path / "metrics-token"
    token.write_text("t0ken")
    text = PROMETHEUS.read_text()
    assert text.count(token_file) == 1
    (tmp_path / "prometheus.yml").write_text(text.replace(token_file, str(token)))
    shutil.copy(ALERTS, tmp_path / "alerts.yml")

    out = run_promtool("check", "config", "prometheus.yml", cwd=tmp_path)

    assert "SUCCESS" in out and "rules found" in out, out


def test_the_alert_unit_tests_pass_and_make_alerts_fire() -> None:
    cases = load_yaml(ALERTS_TEST)
    assert cases["rule_files"] == [ALERTS.name]
    firing = {
        check["alertname"]
        for case in cases["tests"]
        for check in case["alert_rule_test"]
        if check["exp_alerts"]
    }
    assert {"LLMRotateNoKeyAvailable", "LLMRotateRecordsDropped"} <= firing, firing

    assert "SUCCESS" in run_promtool("test", "rules", ALERTS_TEST.name)


def test_the_alert_unit_tests_fail_when_an_alert_would_not_fire(tmp_path: Path) -> None:
    """The unit tests are not vacuous: with all keys unavailable never matching, they fail."""
    rules = ALERTS.read_text().replace(
        "(llmrotate_keys_available) == 0", "(llmrotate_keys_available) < 0"
    )
    assert rules != ALERTS.read_text()
    (tmp_path / "alerts.yml").write_text(rules)
    shutil.copy(ALERTS_TEST, tmp_path / ALERTS_TEST.name)

    done = subprocess.run(
        [promtool(), "test", "rules", ALERTS_TEST.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode != 0
    assert "LLMRotateNoKeyAvailable" in done.stdout + done.stderr


# --- The Grafana dashboard --------------------------------------------------------------------


def test_the_dashboard_is_valid_json_with_unique_panel_ids_and_no_overlaps() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    assert board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels(board):
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        refs = [target["refId"] for target in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(board):
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_dashboard_query_uses_the_data_source_variable() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    source = variables["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_dashboard_filters_by_route_and_provider(catalogue: dict[str, set[str]]) -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    for name in ("route", "provider"):
        query = variables[name]["query"]
        query = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(rf"label_values\((\w+), *{name}\)", query)
        assert match and name in catalogue[match[1]], query
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    exprs = " ".join(expr for _, expr in dashboard_exprs())
    assert 'route=~"$route"' in exprs and 'provider=~"$provider"' in exprs


def test_dashboard_queries_refer_only_to_series_the_gateway_exposes(
    catalogue: dict[str, set[str]], label_values: dict[str, set[str]]
) -> None:
    problems = {
        f"{title}: {expr}": found
        for title, expr in dashboard_exprs()
        if (found := promql_problems(without_grafana_variables(expr), catalogue, label_values))
    }
    assert problems == {}


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """As recording rules, promtool parses each query as Prometheus would (Grafana's variables
    replaced by values of their kind)."""
    exprs = [without_grafana_variables(expr) for _, expr in dashboard_exprs()]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))

    assert f"SUCCESS: {len(exprs)} rules found" in run_promtool("check", "rules", str(path))


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    exprs = " ".join(expr for _, expr in dashboard_exprs())
    for wanted in (
        "sum by (route) (rate(llmrotate_requests_total",  # traffic by route
        "sum by (outcome, status_class) (rate(llmrotate_requests_total",  # errors by outcome
        "histogram_quantile(0.99, sum by (le) (rate(llmrotate_request_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (le) (rate(llmrotate_time_to_first_token_seconds_bucket",
        "rate(llmrotate_cost_usd_total",
        "sum by (type) (rate(llmrotate_tokens_total",
        "max by (provider, state) (llmrotate_keys",
        "llmrotate_circuit_breaker_state",
        "llmrotate_recorder_queue_depth",
        "llmrotate_recorder_write_failures_total",
        "llmrotate_recorder_records_spooled_total",
        "llmrotate_recorder_records_dropped_total",
        "histogram_quantile(0.5, sum by (le) (rate(llmrotate_gateway_overhead_seconds_bucket",
        "llmrotate_failovers_total",
        "llmrotate_key_rotations_total",
    ):
        assert wanted in exprs, wanted


def test_shared_state_gauges_are_aggregated_with_max_not_sum() -> None:
    """Every host reports the same keys and breakers: a sum would count them once per host."""
    from llmrotate_site.metrics import SHARED_STATE_GAUGES

    queries = [expr for _, expr in dashboard_exprs()] + [r["expr"] for r in alert_rules()]
    for expr in queries:
        flat = GROUPING.sub(r"\1", expr)
        for name in SHARED_STATE_GAUGES:
            assert not re.search(rf"\b(sum|avg)\b[^()]*\([^()]*\b{name}\b", flat), expr


# --- Provisioning and compose ---------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(REPO / "compose.yaml")


def mounts(svc: dict[str, Any]) -> dict[str, tuple[Path, bool]]:
    """Container path → (file or directory in the repository, read-only) of the bind mounts."""
    found = {}
    for volume in svc.get("volumes", []):
        source, target, *mode = volume.split(":")
        if source.startswith("./"):
            found[target] = (REPO / source, mode == ["ro"])
    return found


OBSERVABILITY = ("prometheus", "grafana")


def test_the_observability_profile_runs_prometheus_and_grafana_only(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    in_profile = {n for n, s in services.items() if "observability" in s.get("profiles", [])}
    assert in_profile == set(OBSERVABILITY)
    for name in OBSERVABILITY:
        assert services[name]["profiles"] == ["observability"], name
        # Both publish on loopback only: no login in front of Prometheus at all.
        for port in services[name]["ports"]:
            assert str(port).startswith("127.0.0.1:"), (name, port)
        for path, (source, read_only) in mounts(services[name]).items():
            assert source.exists(), f"{name} mounts {source}, which is not in the repository"
            assert read_only, f"{name} mounts {path} writable"
    assert services["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    assert services["grafana"]["ports"] == ["127.0.0.1:3000:3000"]


def test_prometheus_loads_the_config_and_rules_from_the_repository(
    compose: dict[str, Any],
) -> None:
    svc = compose["services"]["prometheus"]
    script = " ".join(svc["command"])
    config_path = re.search(r"--config\.file=(\S+)", script)
    assert config_path
    mounted = mounts(svc)
    assert mounted[config_path[1]][0] == PROMETHEUS
    config = load_yaml(PROMETHEUS)
    config_dir = Path(config_path[1]).parent
    for rule_file in config["rule_files"]:
        assert mounted[str(config_dir / rule_file)][0] == ASSETS / rule_file
    assert (ASSETS / "alerts.yml").name in config["rule_files"]


def test_prometheus_scrapes_web_with_the_token_the_gateway_accepts(
    compose: dict[str, Any],
) -> None:
    svc = compose["services"]["prometheus"]
    (job,) = load_yaml(PROMETHEUS)["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["web:8000"]
    assert "8000" in compose["services"]["web"]["ports"][0]
    token_file = job["authorization"]["credentials_file"]
    assert job["authorization"].get("type", "Bearer") == "Bearer"
    # The entry point writes the shared variable to the file the config reads, on a tmpfs.
    script = " ".join(svc["command"])
    assert f'"$LLMROTATE_METRICS_TOKEN" > {token_file}' in script.replace("$$", "$")
    assert str(Path(token_file).parent) in svc["tmpfs"]
    assert "exec /bin/prometheus " in script
    variable = "${LLMROTATE_METRICS_TOKEN:-}"
    assert svc["environment"]["LLMROTATE_METRICS_TOKEN"] == variable
    assert compose["services"]["web"]["environment"]["LLMROTATE_METRICS_TOKEN"] == variable


def test_gateway_containers_keep_their_counters_off_the_shared_volume(
    compose: dict[str, Any],
) -> None:
    """PIDs repeat across containers: on the shared volume one container's counter files would
    be read, and overwritten, as another's."""
    for name in ("web", "worker", "beat"):
        svc = compose["services"][name]
        metrics_dir = svc["environment"]["LLMROTATE_METRICS_DIR"]
        assert not metrics_dir.startswith(svc["environment"]["LLMROTATE_DATA_DIR"]), name
        assert not any(v.split(":")[1] == metrics_dir for v in svc["volumes"]), name


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard(
    compose: dict[str, Any],
) -> None:
    svc = compose["services"]["grafana"]
    mounted = mounts(svc)
    assert mounted["/etc/grafana/provisioning/datasources"][0] == PROVISIONING / "datasources"
    assert mounted["/etc/grafana/provisioning/dashboards"][0] == PROVISIONING / "dashboards"
    assert svc["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert svc["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"

    (source,) = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert "9090" in compose["services"]["prometheus"]["ports"][0]
    # The dashboard's data source variable starts on the provisioned one.
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == source["uid"]

    (provider,) = load_yaml(PROVISIONING / "dashboards" / "llmrotate.yml")["providers"]
    assert provider["type"] == "file"
    folder = Path(provider["options"]["path"])
    dashboards = {t: s for t, (s, _) in mounted.items() if Path(t).parent == folder}
    assert dashboards == {str(folder / DASHBOARD.name): DASHBOARD}
    home = svc["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home in dashboards
