# Two commands: `make run` (set up and start the gateway) and `make test` (set up and run every
# test). Both create ./.venv on first use and reinstall only when pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HASH := $(shell sha1sum pyproject.toml | cut -c1-12)

# The scaled-out test leg: real Postgres and Redis. Override to point elsewhere.
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/llmrotate
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15
TEST_EMBEDDED_REDIS_URL ?= redis://127.0.0.1:6379/14
TEST_CHAOS_REDIS_URL ?= redis://127.0.0.1:6379/13
PYTEST_ARGS ?=

.PHONY: run test test-lint-then-embedded test-embedded test-scaled test-campaign test-chaos test-soak lint demo fake-upstream bench bench-limits bench-translation bench-capture bench-replacement soak clean browser promtool gettext messages

$(VENV)/.base-$(HASH):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing dependencies into $(VENV) …"
	@$(BIN)/pip install --disable-pip-version-check -q -e .
	@touch $@

$(VENV)/.dev-$(HASH): $(VENV)/.base-$(HASH)
	@echo "installing test dependencies into $(VENV) …"
	@$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $@

run: $(VENV)/.base-$(HASH)
	$(BIN)/python manage.py serve

demo: $(VENV)/.base-$(HASH)
	$(BIN)/python manage.py demo

fake-upstream: $(VENV)/.base-$(HASH)
	$(BIN)/python manage.py fake_upstream

lint: $(VENV)/.dev-$(HASH)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy .
	$(BIN)/hadolint Dockerfile

# Each leg has a data folder (SQLite, spool, captures, metrics) and a Redis database of its own,
# so that `make test` can run both at once, one per core.
# Embedded default: SQLite, key state in process, no Redis (the few tests of the Redis stores
# themselves use database 14).
test-embedded: $(VENV)/.dev-$(HASH)
	@echo "=== tests: embedded mode (SQLite, in-process key state) ==="
	env -u DATABASE_URL -u REDIS_URL LLMROTATE_TEST_LEG=embedded \
		LLMROTATE_DATA_DIR=var/test-embedded LLMROTATE_TEST_REDIS_URL=$(TEST_EMBEDDED_REDIS_URL) \
		$(BIN)/pytest --ignore=tests/chaos $(PYTEST_ARGS)

# Scaled out: Postgres and Redis over real connections.
test-scaled: $(VENV)/.dev-$(HASH)
	@echo "=== tests: scaled-out mode (Postgres + Redis) ==="
	DATABASE_URL=$(TEST_DATABASE_URL) REDIS_URL=$(TEST_REDIS_URL) LLMROTATE_TEST_LEG=scaled \
		LLMROTATE_DATA_DIR=var/test-scaled LLMROTATE_TEST_REDIS_URL=$(TEST_REDIS_URL) \
		$(BIN)/pytest --ignore=tests/chaos $(PYTEST_ARGS)

# The fault campaign (docs/reliability.md): real processes, a Postgres cluster and redis-servers
# of its own (tests/chaos/harness.py), so it needs neither leg's database and runs as a job of
# its own beside them. Mostly waiting (outages, restarts), so it costs the legs little CPU.
CHAOS_ENV = env -u DATABASE_URL -u REDIS_URL LLMROTATE_TEST_LEG=embedded \
	LLMROTATE_TEST_REDIS_URL=$(TEST_CHAOS_REDIS_URL)

test-chaos: $(VENV)/.dev-$(HASH)
	@echo "=== tests: fault campaign (tests/chaos) ==="
	$(CHAOS_ENV) LLMROTATE_DATA_DIR=var/test-chaos \
		$(BIN)/pytest tests/chaos --ignore=tests/chaos/test_soak.py $(PYTEST_ARGS)

# The soak's CI version: 3 minutes (LLMROTATE_SOAK_SECONDS) of what `make soak` runs for 30.
test-soak: $(VENV)/.dev-$(HASH)
	@echo "=== tests: soak (tests/chaos/test_soak.py) ==="
	$(CHAOS_ENV) LLMROTATE_DATA_DIR=var/test-soak $(BIN)/pytest tests/chaos/test_soak.py $(PYTEST_ARGS)

# Debian's chromium, which the dashboard's browser tests drive through Playwright (its own
# browser download is not used). Installed only when missing; sudo only when not root.
browser:
	@test -x /usr/bin/chromium || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# promtool, with which the tests check docs/observability/ (the alert rules and their unit
# tests, the scrape config). Taken out of Debian's prometheus package without installing it: no
# daemon, no service, no maintainer scripts; the one binary, into .tools/. Only when missing;
# sudo only for the apt-get update a stale package list needs.
PROMTOOL := .tools/bin/promtool

promtool: $(PROMTOOL)

$(PROMTOOL):
	@rm -rf .tools/deb && mkdir -p .tools/deb .tools/bin
	@cd .tools/deb && { apt-get download -qq prometheus 2>/dev/null || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && apt-get download -qq prometheus; }; }
	dpkg-deb --fsys-tarfile .tools/deb/prometheus_*.deb | tar -xO ./usr/bin/promtool > $@.tmp
	@chmod +x $@.tmp && mv $@.tmp $@ && rm -rf .tools/deb
	@$@ --version | head -1

# GNU gettext (xgettext, msgmerge, msgfmt, msgattrib): `make messages` and the test that every
# marked string is translated in every language run them. Installed only when missing.
gettext:
	@command -v msgfmt >/dev/null && command -v xgettext >/dev/null || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gettext; }

# The dashboard's and the admin's catalogues (docs/dashboard.md, "Languages"): every marked
# string into llmrotate_site/locale/<language>/LC_MESSAGES/django.po and djangojs.po, English
# filled in from the source, compiled to the .mo files committed beside them (so that `make run`
# needs no gettext). Translate what it lists as missing in the .po files, then run it again.
messages: $(VENV)/.dev-$(HASH) gettext
	$(BIN)/python manage.py update_messages

# Three jobs side by side: lint then the embedded leg, the scaled leg, and the fault campaign
# then the soak (most of a leg is one pytest process on one core; the campaign mostly waits).
# Each job's output is printed as a block when it ends, and any failing fails the target.
test: browser promtool gettext
	@$(MAKE) --no-print-directory -j3 --output-sync=target \
		test-lint-then-embedded test-scaled test-campaign

# Each job depends on the venv, so that it is made once, before any of them starts.
test-lint-then-embedded: $(VENV)/.dev-$(HASH) lint
	@$(MAKE) --no-print-directory test-embedded

# The fault campaign, then the soak (the soak runs even when the campaign failed).
test-campaign: $(VENV)/.dev-$(HASH)
	@$(MAKE) --no-print-directory test-chaos; chaos=$$?; \
		$(MAKE) --no-print-directory test-soak && exit $$chaos

bench: $(VENV)/.dev-$(HASH)
	$(BIN)/python bench/proxy_overhead.py

# What a client's limits add to a call, embedded and with Redis (issue #14). Needs Redis on
# 127.0.0.1:6379 for the scaled rows (`--modes embedded` runs without).
BENCH_REDIS_URL ?= redis://127.0.0.1:6379/0

bench-limits: $(VENV)/.dev-$(HASH)
	$(BIN)/python bench/limits_overhead.py --redis-url $(BENCH_REDIS_URL)

# What serving a chat completion from an Anthropic deployment (translated both ways) adds over
# the native path (issue #13). No Redis.
bench-translation: $(VENV)/.dev-$(HASH)
	$(BIN)/python bench/translation_overhead.py

# What wire capture of all of a client's traffic adds to a call, and takes from one worker's
# throughput (issue #11). No Redis.
bench-capture: $(VENV)/.dev-$(HASH)
	$(BIN)/python bench/capture_overhead.py

# What three model replacement rules on a route cost per request: in process, and through the
# gateway against a route without rules (issue #12). No Redis.
bench-replacement: $(VENV)/.dev-$(HASH)
	$(BIN)/python bench/replacement_rules.py

# The soak (issue #16): 30 minutes of mixed traffic (SDK calls, JSON and streams, with scripted
# faults to fail over on, probes, a polling dashboard) on one gateway worker, embedded, no
# Redis; its RSS, descriptors, upstream connections and recorder queue must stay flat. Fails
# when one grows. CI runs 3 minutes of it (tests/chaos/test_soak.py).
soak: $(VENV)/.dev-$(HASH)
	$(BIN)/python bench/soak.py --check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .tools
