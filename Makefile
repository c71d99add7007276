# Everything runs from the project's own virtual environment, created on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)

.PHONY: run test bench bench-payouts bench-messaging bench-watermark bench-quota bench-webhooks reconcile clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	rm -f $(VENV)/.installed-* && touch $(STAMP)

run: $(STAMP)  ## the whole system on embedded defaults; the gateway on 127.0.0.1:8080
	$(PY) -m services.run

test: $(STAMP)  ## the suite (PostgreSQL/Redis when DATABASE_URL/REDIS_URL are set, else SQLite + embedded redis)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)  ## API throughput against a hello-world baseline (needs PostgreSQL: BENCH_DATABASE_URL)
	$(PY) bench/api.py

bench-payouts: $(STAMP)  ## payout latency against a bare Celery round trip, and drain time (needs PostgreSQL)
	$(PY) bench/payouts.py

bench-messaging: $(STAMP)  ## page latency on 100 vs 100,000 messages, and posts per second (needs PostgreSQL)
	$(PY) bench/messaging.py

bench-watermark: $(STAMP)  ## the preview render against a bare Pillow resize and ImageMagick
	$(PY) bench/watermark.py

bench-quota: $(STAMP)  ## generate calls/s with and without contention on one order, and an over-issue check (needs PostgreSQL)
	$(PY) bench/quota.py

bench-webhooks: $(STAMP)  ## webhook events/s to a local receiver against its capacity, and transition-to-delivery lag (needs PostgreSQL)
	$(PY) bench/webhooks.py

reconcile: $(STAMP)  ## the ledger against the orders and the payout rail; exit 1 on any mismatch
	$(PY) -m services.payouts.reconcile

clean:
	rm -rf var/
