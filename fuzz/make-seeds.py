#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (seeds/<target>/<name>): well-formed inputs, and
the hostile ones the worker's hardening is about. Run from fuzz/ after changing a seed here; the
seeds are committed, the corpus a fuzzer grows is not (corpus/, ignored)."""
import base64
import json
import os
import struct

SEEDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def write(target, name, data):
    folder = os.path.join(SEEDS, target)
    os.makedirs(folder, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def nested(levels):
    text = "1"
    for _ in range(levels):
        text = '{"a":' + text + "}"
    return text


# The job parser (fuzz_targets/job.rs).
JOBS = {
    "minimal": '{"prompt":"a lighthouse at dusk"}',
    "full": json.dumps({
        "version": 2, "id": "job-1", "batch": "b-1", "provider": "openai",
        "prompt": "a red fox", "negative_prompt": "blur", "seed": 42, "model": "gpt-image-1",
        "size": "1024x1536", "quality": "high", "output_format": "webp", "background": "opaque",
        "n": 3, "params": {"user": "u-1", "moderation": "low"},
        "metadata": {"campaign": "spring", "tags": ["a", "b"], "n": 1.5e3},
        "deadline": "2030-01-01T00:00:00Z",
    }),
    "duplicate-field": '{"id":"a","prompt":"p","n":1,"n":10}',
    "duplicate-param": '{"id":"a","prompt":"p","params":{"user":"u","user":"v"}}',
    "metadata-33-levels": '{"id":"a","prompt":"p","metadata":' + nested(33) + "}",
    "metadata-32-levels": '{"id":"a","prompt":"p","metadata":' + nested(32) + "}",
    "metadata-exact-bytes": '{"id":"m","prompt":"p","metadata":{"x":1.0e0,"y":"\\u00e9"}}',
    "id-dotdot": '{"id":"..","prompt":"p"}',
    "id-slash": '{"id":"a/../../etc","prompt":"p"}',
    "batch-reserved": '{"id":"a","batch":"_","prompt":"p"}',
    "batch-traversal": '{"id":"a","batch":"../x","prompt":"p"}',
    "n-huge": '{"id":"a","prompt":"p","n":18446744073709551616}',
    "seed-negative": '{"id":"a","prompt":"p","seed":-1}',
    "seed-float": '{"id":"a","prompt":"p","seed":1e400}',
    "worker-param": '{"id":"a","prompt":"p","params":{"model":"x","stream":true}}',
    "unknown-field-control-chars": '{"id":"a","prompt":"p","\\u001b[2Jx":1}',
    "prompt-control-chars": '{"id":"a","prompt":"\\u001b]0;owned\\u0007 a cat"}',
    "null-field": '{"id":"a","prompt":"p","model":null}',
    "version-0": '{"id":"a","prompt":"p","version":0}',
    "deadline-bad": '{"id":"a","prompt":"p","deadline":"9999-99-99T99:99:99Z"}',
    "unknown-provider": '{"id":"a","prompt":"p","provider":"nope"}',
    "not-json": "not json",
    "array": "[1,2]",
    "bom": "\ufeff" + '{"prompt":"p"}',
    "references-outputs": json.dumps({
        "version": 3, "id": "r", "batch": "b", "prompt": "p", "background": "transparent",
        "fail_if_opaque": True,
        "images": ["refs/plate.png", "https://cdn.example.com/a.webp?sig=x", "job:j#1",
                   {"job": "j", "index": 2, "batch": "other"}, {"key": "k.png"}],
        "mask": "refs/mask.png",
        "outputs": [{"name": "tile", "size": "512x512"},
                    {"name": "web", "size": "1024x768", "fit": "inside", "format": "webp", "quality": 80},
                    {"name": "ll", "size": "64x64", "format": "webp", "lossless": True}],
    }),
    "reference-traversal": '{"id":"a","prompt":"p","images":["../x.png","/abs","job:a#99"]}',
    "outputs-bad": '{"id":"a","prompt":"p","outputs":[{"name":"A","size":"0x99999","format":"gif"}]}',
}
for name, text in JOBS.items():
    write("job", name, text)
write("job", "not-utf8", b'\xff\xfe{"prompt":"p"}')
write("job", "unicode-prompt", '{"id":"u","prompt":"灯台 🌅 é\u0301"}')

# The OpenAI Images API's answers (fuzz_targets/openai_answer.rs).
PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452")
B64 = base64.b64encode(PNG).decode()
ANSWERS = {
    "b64": json.dumps({"created": 1, "data": [{"b64_json": B64, "revised_prompt": "r"}],
                       "usage": {"input_tokens": 10, "output_tokens": 4160,
                                 "total_tokens": 4170}, "output_format": "png"}),
    "b64-two": json.dumps({"data": [{"b64_json": B64}, {"b64_json": base64.b64encode(b"x" * 40).decode()}]}),
    "b64-escaped-slash": '{"data":[{"b64_json":"' + base64.b64encode(b"\xff\xff\xff" * 4).decode().replace("/", "\\/") + '"}]}',
    "b64-null-then-url": '{"data":[{"b64_json":null,"url":"https://example.com/i.png"}]}',
    "url": '{"data":[{"url":"https://oaidalleapiprodscus.blob.core.windows.net/private/img.png?sig=x"}]}',
    "b64-invalid": '{"data":[{"b64_json":"!!!!"}]}',
    "key-inside-a-string": '{"data":[{"revised_prompt":"say \\"b64_json\\": \\"x\\"","b64_json":"' + B64 + '"}]}',
    "key-outside-data": '{"b64_json":"' + B64 + '","data":[]}',
    "spaces": '{ "data" : [ { "b64_json" : "' + B64 + '" } ] }',
    "empty": "{}",
    "data-not-array": '{"data":{"b64_json":"AAAA"}}',
    "error-quota": '{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}',
    "error-refusal": '{"error":{"message":"Your request was rejected by the safety system.","type":"image_generation_user_error","param":null,"code":"moderation_blocked"}}',
    "error-azure-filter": '{"error":{"code":"content_policy_violation","message":"filtered","inner_error":{"code":"ResponsibleAIPolicyViolation","content_filter_results":{"violence":{"filtered":true,"severity":"high"}}}}}',
    "error-numeric-code": '{"error":{"message":"","code":429}}',
    "error-model": '{"error":{"message":"Your organization must be verified to use the model gpt-image-1","type":"invalid_request_error","code":null}}',
}
for name, text in ANSWERS.items():
    write("openai_answer", name, text)

# The Gemini API's answers (fuzz_targets/gemini_answer.rs): the first byte picks the reader (even:
# a 200 answer, odd: an error body, its status from the byte).
GEMINI = {
    "image": '{"candidates":[{"content":{"parts":[{"text":"Here."},{"inlineData":{"mimeType":"image/png","data":"' + B64 + '"}}]},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":1290},"modelVersion":"gemini-2.5-flash-image","responseId":"r"}',
    "image-snake": '{"candidates":[{"content":{"parts":[{"inline_data":{"mime_type":"image/png","data":"' + B64 + '"}}]}}]}',
    "escaped-slash": '{"candidates":[{"content":{"parts":[{"inlineData":{"data":"' + base64.b64encode(b"\xff\xff\xff" * 4).decode().replace("/", "\\/") + '"}}]}}]}',
    "thought": '{"candidates":[{"content":{"parts":[{"thought":true,"inlineData":{"data":"' + B64 + '"}},{"inlineData":{"data":"' + B64 + '"}}]}}]}',
    "blocked": '{"promptFeedback":{"blockReason":"PROHIBITED_CONTENT"}}',
    "image-safety": '{"candidates":[{"finishReason":"IMAGE_SAFETY","finishMessage":"no"}]}',
    "text-only": '{"candidates":[{"content":{"parts":[{"text":"Which fox?"}]},"finishReason":"STOP"}]}',
}
for name, text in GEMINI.items():
    write("gemini_answer", name, b"\x00" + text.encode())
GEMINI_ERRORS = {
    "per-minute": (29, '{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"Please retry in 2.5s.","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerMinutePerProjectPerModel"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"17s"}]}}'),
    "per-day": (29, '{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]}]}}'),
    "bad-key": (0, '{"error":{"code":400,"status":"INVALID_ARGUMENT","message":"API key not valid.","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID"}]}}'),
    "huge-delay": (29, '{"error":{"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"1e300s"}]}}'),
}
for name, (status, text) in GEMINI_ERRORS.items():
    write("gemini_answer", "error-" + name, bytes([status * 2 + 1]) + text.encode())

# Black Forest Labs' answers (fuzz_targets/bfl_answer.rs): the first byte picks the reader (mod 3:
# 0 a submit's answer, 1 a poll's, 2 an error body of status 400 + byte / 3).
BFL = {
    "submit": (0, '{"id":"4f1c2d3e-0001-4abc-a123-0123456789ab","polling_url":"https://api.eu1.bfl.ai/v1/get_result?id=4f1c","cost":3.0,"input_mp":0,"output_mp":1.05}'),
    "submit-no-url": (0, '{"id":"x"}'),
    "submit-array": (0, '["i","h"]'),
    "poll-pending": (1, '{"id":"x","status":"Pending","result":null,"progress":0.4}'),
    "poll-ready": (1, '{"id":"x","status":"Ready","result":{"sample":"https://delivery-eu1.bfl.ai/results/x/sample.png?se=1&sig=2","seed":7,"prompt":"p"}}'),
    "poll-moderated": (1, '{"id":"x","status":"Content Moderated","details":{"Moderation Reasons":["x"]}}'),
    "poll-not-found": (1, '{"id":"x","status":"Task not found"}'),
    "error-credits": (3 * 2 + 2, '{"detail":"Insufficient credits"}'),
    "error-empty-detail": (3 * 22 + 2, '{"detail":[]}'),
    "error-422": (3 * 22 + 2, '{"detail":[{"loc":["body","width"],"msg":"Input should be a multiple of 16","type":"multiple_of"}]}'),
}
for name, (selector, text) in BFL.items():
    write("bfl_answer", name, bytes([selector]) + text.encode())

# Stability AI's answers (fuzz_targets/stability_answer.rs): the first byte picks the reader (mod 3:
# 0 a JSON answer, 1 a finish reason, 2 an error body of status 400 + byte / 3).
STABILITY = {
    "json": (0, '{"image":"' + B64 + '","finish_reason":"SUCCESS","seed":42}'),
    "json-filtered": (0, '{"image":"","finish_reason":"CONTENT_FILTERED","seed":42}'),
    "finish-filtered": (1, 'CONTENT_FILTERED'),
    "moderation": (3 * 3 + 2, '{"id":"e1","name":"content_moderation","errors":["Your request was flagged by our content moderation system."]}'),
    "credits": (3 * 2 + 2, '{"id":"e2","name":"payment_required","errors":["You lack sufficient credits"]}'),
    "rate-limit": (3 * 29 + 2, '{"id":"e3","name":"rate_limit_exceeded","errors":["timed out for 60 seconds"]}'),
}
for name, (selector, text) in STABILITY.items():
    write("stability_answer", name, bytes([selector]) + text.encode())

# Replicate's answers (fuzz_targets/replicate_answer.rs): an even first byte is a prediction, an
# odd one an error body of status 400 + byte / 2.
REPLICATE = {
    "starting": (0, '{"id":"p1","status":"starting","urls":{"get":"https://api.replicate.com/v1/predictions/p1","cancel":"https://api.replicate.com/v1/predictions/p1/cancel"},"output":null}'),
    "succeeded": (0, '{"id":"p1","status":"succeeded","urls":{"get":"g"},"output":["https://replicate.delivery/a.png"],"metrics":{"predict_time":1.5}}'),
    "nsfw": (0, '{"id":"p1","status":"failed","urls":{"get":"g"},"error":"All generated images contained NSFW content."}'),
    "throttled": (2 * 29 + 1, '{"detail":"Request was throttled. Expected available in 3 seconds.","status":429}'),
    "invalid": (2 * 22 + 1, '{"title":"Input validation failed","detail":"- input.width: Must be less than or equal to 1440","status":422}'),
}
for name, (selector, text) in REPLICATE.items():
    write("replicate_answer", name, bytes([selector]) + text.encode())

# fal's answers (fuzz_targets/fal_answer.rs): the first byte picks the reader (mod 4: 0 a submit's
# answer, 1 a status, 2 a result, 3 an error body of status 400 + byte / 4).
FAL = {
    "submit": (0, '{"request_id":"r1","response_url":"https://queue.fal.run/fal-ai/flux/requests/r1","status_url":"https://queue.fal.run/fal-ai/flux/requests/r1/status","cancel_url":"https://queue.fal.run/fal-ai/flux/requests/r1/cancel","queue_position":0}'),
    "status-queued": (1, '{"status":"IN_QUEUE","queue_position":3}'),
    "status-completed": (1, '{"status":"COMPLETED","logs":null}'),
    "result": (2, '{"images":[{"url":"https://v3.fal.media/files/a.png","width":1024,"height":768,"content_type":"image/png"}],"seed":7,"has_nsfw_concepts":[false]}'),
    "result-flagged": (2, '{"images":[{"url":"https://v3.fal.media/files/a.png"}],"has_nsfw_concepts":[true]}'),
    "locked": (4 * 3 + 3, '{"detail":"User is locked. Reason: Exhausted balance."}'),
    "invalid": (4 * 22 + 3, '{"detail":[{"loc":["body","num_images"],"msg":"ensure this value is less than or equal to 4","type":"value_error"}]}'),
}
for name, (selector, text) in FAL.items():
    write("fal_answer", name, bytes([selector]) + text.encode())

# The Batch API (fuzz_targets/batch_answer.rs): the first byte picks the reader (mod 3: 0 a line of
# an output or error file, 1 a batch object, 2 a list of batches).
BATCH = {
    "line-ok": (0, '{"id":"batch_req_1","custom_id":"night/j00001","response":{"status_code":200,"request_id":"req_1","body":{"created":1,"data":[{"b64_json":"iVBORw0KGgo="}],"usage":{"input_tokens":9,"output_tokens":272}}},"error":null}'),
    "line-refused": (0, '{"id":"batch_req_2","custom_id":"_/j2","response":{"status_code":400,"request_id":"req_2","body":{"error":{"message":"Your request was rejected by the safety system.","type":"image_generation_user_error","param":null,"code":"moderation_blocked"}}},"error":null}'),
    "line-expired": (0, '{"id":"batch_req_3","custom_id":"b/j3","response":null,"error":{"code":"batch_expired","message":"This request could not be executed before the completion window expired."}}'),
    "batch": (1, '{"id":"batch_1","object":"batch","endpoint":"/v1/images/generations","status":"in_progress","input_file_id":"file-1","output_file_id":null,"error_file_id":null,"created_at":1796637546,"request_counts":{"total":3,"completed":1,"failed":0},"metadata":{"imagegen_file":"1796637546634-6cc14a04"}}'),
    "batch-failed": (1, '{"id":"batch_2","status":"failed","errors":{"object":"list","data":[{"code":"duplicate_custom_id","message":"twice","param":null,"line":2}]}}'),
    "list": (2, '{"object":"list","data":[{"id":"batch_2","status":"completed","created_at":2}],"first_id":"batch_2","last_id":"batch_2","has_more":false}'),
}
for name, (selector, text) in BATCH.items():
    write("batch_answer", name, bytes([selector]) + text.encode())

# Self-hosted servers (fuzz_targets/selfhosted_answer.rs): the first byte picks the reader (mod 8:
# 0 a ComfyUI history, 1 a job, 2 the queue, 3 the queue length, 4 a refused graph, 5 an
# AUTOMATIC1111 answer, 6 its error body of status 400 + byte / 8, 7 a workflow).
P = "0b5c1f3e-8a2d-4c6f-9e1a-2b3c4d5e6f70"
SELFHOSTED = {
    "history-done": (0, '{"%s":{"prompt":[1,"%s",{},{},["9"]],"outputs":{"9":{"images":[{"filename":"imagegen_00001_.png","subfolder":"","type":"output"}]}},"status":{"status_str":"success","completed":true,"messages":[["execution_start",{"prompt_id":"%s","timestamp":1000}],["execution_success",{"prompt_id":"%s","timestamp":4000}]]}}}' % (P, P, P, P)),
    "history-error": (0, '{"%s":{"outputs":{},"status":{"status_str":"error","completed":false,"messages":[["execution_error",{"node_id":"3","node_type":"KSampler","exception_type":"torch.OutOfMemoryError","exception_message":"out of memory"}]]}}}' % P),
    "history-empty": (0, '{}'),
    "job": (1, '{"id":"%s","status":"completed","execution_start_time":1,"execution_end_time":9,"outputs":{"9":{"images":[{"filename":"a.png","subfolder":"","type":"output"}]}}}' % P),
    "queue": (2, '{"queue_running":[[0,"%s",{},{},["9"]]],"queue_pending":[[1,"x",{},{},["9"]]]}' % P),
    "queue-length": (3, '{"exec_info":{"queue_remaining":2}}'),
    "node-errors": (4, '{"error":{"type":"prompt_outputs_failed_validation","message":"Prompt outputs failed validation","details":"","extra_info":{}},"node_errors":{"4":{"errors":[{"type":"value_not_in_list","message":"Value not in list","details":"ckpt_name: x not in []"}],"dependent_outputs":["9"],"class_type":"CheckpointLoaderSimple"}}}'),
    "txt2img": (5, '{"images":["iVBORw0KGgo=","iVBORw0KGgo="],"parameters":{},"info":"{\\"index_of_first_image\\": 1, \\"all_seeds\\": [1]}"}'),
    "oom": (8 * 12 + 6, '{"error":"OutOfMemoryError","detail":"","body":"","errors":"CUDA out of memory"}'),
    "workflow": (7, open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "config", "workflows", "comfyui-txt2img.json")).read()),
}
for name, (selector, text) in SELFHOSTED.items():
    write("selfhosted_answer", name, bytes([selector]) + text.encode())

# Entra ID token answers (fuzz_targets/entra_grant.rs): a first byte below 128 is HTTP 200, else a
# status of 400 + byte % 200.
ENTRA = {
    "grant": (0, '{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"eyJ0eXAiOiJKV1QifQ.e30.sig"}'),
    "grant-string-lifetime": (0, '{"token_type":"Bearer","expires_in":"3599","access_token":"eyJ0"}'),
    "invalid-client": (201, '{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: 0","error_codes":[7000215]}'),
    "throttled": (229, '{"error":"temporarily_unavailable"}'),
}
for name, (selector, text) in ENTRA.items():
    write("entra_grant", name, bytes([selector]) + text.encode())

# Rate-limit and retry headers (fuzz_targets/http_headers.rs): `N:value` sets the Nth name the
# readers look at, `name: value` any other.
NAMES = ["retry-after", "retry-after-ms", "x-ratelimit-limit-requests",
         "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
         "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"]


def headers(pairs):
    out = b""
    for name, value in pairs:
        key = bytes([NAMES.index(name)]) if name in NAMES else name.encode()
        out += key + b":" + value.encode() + b"\n"
    return out


HEADERS = {
    "openai-limits": [("x-ratelimit-limit-requests", "50"), ("x-ratelimit-remaining-requests", "49"),
                      ("x-ratelimit-reset-requests", "1.2s"), ("x-ratelimit-limit-tokens", "100000"),
                      ("x-ratelimit-remaining-tokens", "95000"), ("x-ratelimit-reset-tokens", "6m0s")],
    "retry-after-seconds": [("retry-after", "20")],
    "retry-after-ms": [("retry-after-ms", "1500.5"), ("retry-after", "9")],
    "retry-after-date": [("retry-after", "Fri, 31 Dec 1999 23:59:59 GMT")],
    "retry-after-far-date": [("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")],
    "retry-after-huge": [("retry-after", "1e300")],
    "retry-after-overflow": [("retry-after", "18446744073709551616")],
    "retry-after-negative": [("retry-after", "-5")],
    "retry-after-nan": [("retry-after-ms", "NaN")],
    "limits-huge": [("x-ratelimit-limit-requests", "1e308"), ("x-ratelimit-remaining-requests", "1e309"),
                    ("x-ratelimit-reset-requests", "99999999h")],
    "limits-negative": [("x-ratelimit-limit-tokens", "-1"), ("x-ratelimit-remaining-tokens", "-1")],
    "limits-zero": [("x-ratelimit-limit-requests", "0.5"), ("x-ratelimit-remaining-requests", "0")],
    "go-durations": [("x-ratelimit-limit-requests", "5"), ("x-ratelimit-remaining-requests", "5"),
                     ("x-ratelimit-reset-requests", "1h2m3.5s250us12ns")],
    "go-duration-bad": [("x-ratelimit-limit-requests", "5"), ("x-ratelimit-remaining-requests", "5"),
                        ("x-ratelimit-reset-requests", "1.2.3xs")],
    "other-header": [("x-request-id", "req_123"), ("retry-after", "  7  ")],
}
for name, pairs in HEADERS.items():
    write("http_headers", name, headers(pairs))


# AMQP field tables (fuzz_targets/amqp_headers.rs), AMQP 0-9-1 as RabbitMQ encodes them.
def short(b):
    return bytes([len(b)]) + b


def long(b):
    return struct.pack(">I", len(b)) + b


def value(v):
    kind, payload = v
    if kind == "S":
        return b"S" + long(payload)
    # RabbitMQ's codes, which the client follows: `s` is a signed 16-bit integer (a short
    # string in the specification), and a value cannot be a short string.
    if kind == "s":
        return b"s" + struct.pack(">h", payload)
    if kind == "u":
        return b"u" + struct.pack(">H", payload)
    if kind == "b":
        return b"b" + struct.pack(">b", payload)
    if kind == "B":
        return b"B" + bytes([payload])
    if kind == "d":
        return b"d" + struct.pack(">d", payload)
    if kind == "f":
        return b"f" + struct.pack(">f", payload)
    if kind == "I":
        return b"I" + struct.pack(">i", payload)
    if kind == "l":
        return b"l" + struct.pack(">q", payload)
    if kind == "i":
        return b"i" + struct.pack(">I", payload)
    if kind == "t":
        return b"t" + bytes([payload])
    if kind == "T":
        return b"T" + struct.pack(">Q", payload)
    if kind == "F":
        return b"F" + table(payload)
    if kind == "A":
        return b"A" + long(b"".join(value(x) for x in payload))
    if kind == "x":
        return b"x" + long(payload)
    if kind == "D":
        return b"D" + bytes([payload[0]]) + struct.pack(">I", payload[1])
    if kind == "V":
        return b"V"
    raise ValueError(kind)


def table(entries):
    return long(b"".join(short(k) + value(v) for k, v in entries))


DEATH = [(b"x-death", ("A", [("F", [(b"reason", ("S", b"delivery_limit")), (b"count", ("l", 3)),
                                   (b"queue", ("S", b"imagegen.jobs")), (b"time", ("T", 1700000000))])]))]
TABLES = {
    "empty": [],
    "attempts-unsealed": [(b"x-imagegen-attempts", ("I", 99))],
    "attempts-forged-seal": [(b"x-imagegen-attempts", ("I", 3)), (b"x-imagegen-seal", ("S", b"00" * 32))],
    "attempts-seal-not-hex": [(b"x-imagegen-attempts", ("l", 2)), (b"x-imagegen-seal", ("S", b"zz\xff"))],
    "attempts-string": [(b"x-imagegen-attempts", ("S", b"18446744073709551617"))],
    "attempts-negative": [(b"x-imagegen-attempts", ("l", -(2 ** 63)))],
    "dead-letter": [(b"x-imagegen-error-kind", ("S", b"content_policy")),
                    (b"x-imagegen-error", ("S", b"refused \x1b[2J")),
                    (b"x-imagegen-attempts", ("i", 1))] + DEATH,
    "death-not-a-table": [(b"x-death", ("A", [("S", b"x"), ("V", None)]))],
    "death-empty": [(b"x-death", ("A", []))],
    "key-not-utf8": [(b"x-\xff\xfe", ("S", b"v\xc3"))],
    # Three bytes of U+FFFD for each: longer than a short string once read.
    "key-255-invalid-bytes": [(b"\xfe" * 255, ("S", b"\xff" * 255))],
    "nested": [(b"a", ("F", [(b"b", ("F", [(b"c", ("A", [("F", [])] * 3))]))]))],
    "every-type": [(b"s", ("s", -2)), (b"u", ("u", 2)), (b"b", ("b", -1)), (b"B", ("B", 255)),
                   (b"d", ("d", float("nan"))), (b"f", ("f", 1.5)), (b"S", ("S", b"long")), (b"I", ("I", -1)), (b"l", ("l", 1)),
                   (b"i", ("i", 7)), (b"t", ("t", 1)), (b"T", ("T", 5)), (b"x", ("x", b"\x00\x01")),
                   (b"D", ("D", (2, 12345))), (b"V", ("V", None))],
    "headers-dropped": [(b"x-imagegen-headers-dropped", ("i", 4000000000))],
}
for name, entries in TABLES.items():
    write("amqp_headers", name, table(entries))
write("amqp_headers", "length-lies", struct.pack(">I", 0xFFFFFFFF) + b"\x01a")
