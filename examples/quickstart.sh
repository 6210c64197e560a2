#!/usr/bin/env bash
# rnnserve quickstart with curl: every v1 REST call on the demo models.
#
#   rnn-serve --model-repo models &          # or: make serve
#   examples/quickstart.sh                   # RNNSERVE_URL / RNNSERVE_API_KEY to override
#
# Needs curl and python3 (only to pick fields out of the JSON answers). The full reference
# is docs/api.md; the interactive one is http://127.0.0.1:8000/docs.
set -euo pipefail

URL="${RNNSERVE_URL:-http://127.0.0.1:8000}"
AUTH=()
if [[ -n "${RNNSERVE_API_KEY:-}" ]]; then
  AUTH=(-H "Authorization: Bearer ${RNNSERVE_API_KEY}")   # or: -H "X-API-Key: ..."
fi

# call METHOD PATH [JSON BODY]: print the request and the pretty-printed answer.
call() {
  local method=$1 path=$2 body=${3:-}
  local shown=$body
  (( ${#shown} > 120 )) && shown="${shown:0:100}...}"
  echo "\$ curl -X $method $URL$path ${shown:+-d '$shown'}" >&2
  if [[ -n "$body" ]]; then
    curl -sS -X "$method" "${AUTH[@]}" -H "Content-Type: application/json" -d "$body" "$URL$path"
  else
    curl -sS -X "$method" "${AUTH[@]}" "$URL$path"
  fi
}
show() { python3 -m json.tool --compact 2>/dev/null || cat; echo; }
field() {  # field '["key"]...': one value of the answer, or stop at an error answer
  python3 -c "import json, sys
d = json.load(sys.stdin)
if 'error' in d:
    sys.exit('server error: ' + json.dumps(d['error']))
print(d$1)"
}

echo "== health (never needs a key)"
curl -sS "$URL/readyz"; echo

echo "== models"
call GET /v1/models | field '["models"][0]["name"]'
call GET /v1/models/sine-lstm | field '["versions"][-1]["card"]["input_size"]'

echo "== batch predict: two independent sequences (a one-feature series may be sent flat)"
call POST /v1/models/sine-lstm/predict '{"inputs": [[0.0, 0.31, 0.59, 0.81], [[0.5], [0.4]]]}' | show
echo "-- only the last step, with the final states, on an explicit version"
call POST /v1/models/adding-rnn/versions/1/predict \
  '{"inputs": [[[0.3, 1], [0.9, 0], [0.1, 0], [0.6, 1], [0.2, 0]]], "return_sequences": false}' | show
echo "-- symbols"
call POST /v1/models/reber-gru/predict '{"inputs": [["B", "T", "S", "S", "X"]]}' | field '["symbols"]'

echo "== a session: the hidden state stays on the server between requests"
SID=$(call POST /v1/models/sine-lstm/sessions | field '["session_id"]')
echo "session $SID"
call POST "/v1/sessions/$SID/steps" '{"inputs": [0.0, 0.31], "seq": 2}' | show
call POST "/v1/sessions/$SID/steps" '{"inputs": [[0.59]], "seq": 3}' | show
echo "-- the same request again (a retry): replayed, not applied twice"
call POST "/v1/sessions/$SID/steps" '{"inputs": [[0.59]], "seq": 3}' | show
echo "-- a seq that fits neither: 409 seq_mismatch"
call POST "/v1/sessions/$SID/steps" '{"inputs": [[0.8]], "seq": 7}' | show
call GET "/v1/sessions/$SID" | show

echo "== value generation (sine-lstm needs a prime)"
call POST "/v1/sessions/$SID/generate" '{"steps": 5, "prime": [0.81]}' | show

echo "== export the state and import it as a new session"
EXPORTED=$(call GET "/v1/sessions/$SID/state")
STATE=$(echo "$EXPORTED" | python3 -c "import json, sys; print(json.dumps({'state': json.load(sys.stdin)['state']}))")
COPY=$(call POST /v1/models/sine-lstm/versions/1/sessions "$STATE" | field '["session_id"]')
echo "copy $COPY"
call POST "/v1/sessions/$COPY/steps" '{"inputs": [0.1]}' | show
call POST "/v1/sessions/$SID/steps" '{"inputs": [0.1]}' | show

echo "== reset, delete"
call POST "/v1/sessions/$SID/reset" | show
echo "\$ curl -X DELETE $URL/v1/sessions/$SID" >&2
curl -sS -o /dev/null -w "%{http_code} (no content)\n" -X DELETE "${AUTH[@]}" "$URL/v1/sessions/$SID"
call DELETE "/v1/sessions/$COPY"
call GET "/v1/sessions/$SID" | show

echo "== symbol generation: reber-gru starts from B and stops at E"
RID=$(call POST /v1/models/reber-gru/sessions | field '["session_id"]')
call POST "/v1/sessions/$RID/generate" '{"steps": 40, "temperature": 1.0, "seed": 7}' | show
call DELETE "/v1/sessions/$RID" >/dev/null

echo "== rescan the model repository"
call POST /v1/repository/reload | show

echo "== streaming needs a WebSocket client: see examples/stream_client.py, or"
echo "   websocat ${URL/http/ws}/v1/models/sine-lstm/stream   then send {\"inputs\": [0.1], \"seq\": 1}"
