<?php
/**
 * The PHP caller side of scripts/interop: one check per run, through the
 * examples' own helper (examples/php/bridge_call.php). Prints "ok: ..." and
 * exits 0, or prints what it expected and what it got and exits 1.
 *
 *     php scripts/interop-calls.php text   /py/echo
 *     php scripts/interop-calls.php binary /node/echo 700000
 *     php scripts/interop-calls.php add    /orders/add
 *     php scripts/interop-calls.php slow   /py/slow 1500
 *     php scripts/interop-calls.php error  /ghost/echo no_worker ['{"ms":5000}']
 *     php scripts/interop-calls.php parallel /py/slow 8 300   (bridge_call_all)
 *     php scripts/interop-calls.php probe  /py/echo          (quiet, for waiting)
 *
 * Workers by id, presence and fan-out (SELECTOR: 'all', 'k=v,k=v', or a JSON
 * object; IDS: the worker ids expected to answer, comma-separated):
 *
 *     php scripts/interop-calls.php worker /fan py-1 10        (bridge_call_worker)
 *     php scripts/interop-calls.php worker-error /fan/echo nobody unknown_worker
 *     php scripts/interop-calls.php workers SERVICE|- META_JSON EXPECT_JSON   (bridge_workers)
 *     php scripts/interop-calls.php workers-error META_JSON bad_request
 *     php scripts/interop-calls.php fanout /fan/echo SELECTOR IDS [binary]
 *     php scripts/interop-calls.php fanout-stream /fan/echo SELECTOR IDS
 *     php scripts/interop-calls.php fanout-error /fan/echo SELECTOR bad_request
 *     php scripts/interop-calls.php push /fan/slow SELECTOR N BODY   (bridge_fanout_push)
 *
 * Jobs (bridge_submit, bridge_result, bridge_job, bridge_cancel):
 *
 *     php scripts/interop-calls.php job /py/echo py-1            (JSON and bytes, byte for byte)
 *     php scripts/interop-calls.php job-wait /py/echo            (answered within 'wait')
 *     php scripts/interop-calls.php job-late /long/py/slow 2500  (not within 'wait': polled)
 *     php scripts/interop-calls.php job-idempotent /py/echo
 *     php scripts/interop-calls.php job-cancel /fan/echo nobody  (queued for an absent worker)
 *     php scripts/interop-calls.php job-errors /py/add           (refused, failed, unknown)
 */
require __DIR__ . '/../examples/php/bridge_call.php';

function fail($what, $expected, $got)
{
    fwrite(STDERR, "FAIL: $what\n  expected: $expected\n  got:      $got\n");
    exit(1);
}

function call_or_fail($what, $fn)
{
    try {
        return $fn();
    } catch (BridgeException $e) {
        fail($what, 'a reply', get_class($e) . ' ' . $e->getMessage());
    }
}

/** Runs $fn, which must throw BridgeException $code with a request id. */
function expect_error($what, $code, $fn)
{
    try {
        $res = $fn();
    } catch (BridgeException $e) {
        if ($e->errorCode !== $code) {
            fail($what, "BridgeException $code", "BridgeException {$e->errorCode}: {$e->getMessage()}");
        }
        if (!preg_match('/^[!-~]{1,128}$/', (string) $e->requestId)) {
            fail("request id of the $code error", 'a request id', json_encode($e->requestId));
        }
        return $e;
    }
    fail($what, "BridgeException $code", 'a reply: ' . json_encode($res));
}

/** Fails unless $id is a job id: 32 hex digits. */
function check_job_id($what, $id)
{
    if (!is_string($id) || !preg_match('/^[0-9a-f]{32}$/', $id)) {
        fail($what, 'a job id (32 hex digits)', json_encode($id));
    }
    return $id;
}

/** Fails unless job $id's document has these fields (['state' => 'queued', ...]). */
function check_job_document($what, $doc, $id, array $want)
{
    $want += ['id' => $id, 'location' => "/_wsbridge/jobs/$id"];
    foreach ($want as $field => $value) {
        if (!is_array($doc) || !array_key_exists($field, $doc) || $doc[$field] !== $value) {
            fail($what, json_encode($want, JSON_UNESCAPED_SLASHES), json_encode($doc, JSON_UNESCAPED_SLASHES));
        }
    }
    return $doc;
}

/** The short form of a value for a message: bytes by their length and hash. */
function shown($value)
{
    if (is_string($value) && preg_match('//u', $value) !== 1) {
        return strlen($value) . ' bytes, sha256 ' . hash('sha256', $value);
    }
    return json_encode($value, JSON_UNESCAPED_UNICODE);
}

/** A selector argument: a JSON object becomes the array form. */
function selector_arg($arg)
{
    return substr($arg, 0, 1) === '{' ? json_decode($arg, true) : $arg;
}

/** The worker ids of a comma-separated argument, sorted. */
function ids_arg($arg)
{
    $ids = $arg === '' ? [] : explode(',', $arg);
    sort($ids);
    return $ids;
}

/**
 * Checks one fan-out result: outcome ok, status 200, the echo's body, and
 * x-echo-worker naming the worker it came from.
 */
function check_fanout_result($what, array $r, $body)
{
    $id = isset($r['worker_id']) ? $r['worker_id'] : null;
    $echoed = isset($r['headers']['x-echo-worker']) ? $r['headers']['x-echo-worker'] : null;
    $got = bridge_fanout_body($r);
    if (
        !is_string($id) || !isset($r['outcome']) || $r['outcome'] !== 'ok' || !isset($r['status']) || $r['status'] !== 200
        || $echoed !== $id || $got !== $body || !isset($r['node']) || $r['node'] !== 'local' || !isset($r['ms']) || !is_int($r['ms'])
    ) {
        $shown = $r;
        if (isset($shown['body']) && strlen($shown['body']) > 80) {
            $shown['body'] = substr($shown['body'], 0, 80) . '...';
        }
        fail($what, 'outcome ok, status 200, node local, ms, the body echoed, x-echo-worker = worker_id', json_encode($shown));
    }
    return $id;
}

$cmd = isset($argv[1]) ? $argv[1] : '';
$path = isset($argv[2]) ? $argv[2] : '';
switch ($cmd) {
    case 'probe':
        try {
            bridge_post($path, 'ping', 'text/plain', 5.0);
            exit(0);
        } catch (BridgeException $e) {
            exit(1);
        }

    case 'text':
        $text = "héllo wörld ✓ " . bin2hex(random_bytes(4)) . "\n";
        $got = call_or_fail("text echo via $path", function () use ($path, $text) {
            return bridge_post($path, $text, 'text/plain; charset=utf-8');
        });
        if ($got !== $text) {
            fail("text echo via $path", json_encode($text), json_encode($got));
        }
        echo "ok: text echo via $path (" . strlen($text) . " bytes of UTF-8)\n";
        exit(0);

    case 'binary':
        $size = (int) $argv[3];
        $data = random_bytes($size);
        $got = call_or_fail("binary echo via $path", function () use ($path, $data) {
            return bridge_post($path, $data);
        });
        $want = hash('sha256', $data);
        $have = hash('sha256', $got);
        if ($want !== $have) {
            fail("binary echo via $path", "$size bytes, sha256 $want", strlen($got) . " bytes, sha256 $have");
        }
        echo "ok: binary echo via $path ($size random bytes, sha256 $want)\n";
        exit(0);

    case 'add':
        $res = call_or_fail("bridge_call $path", function () use ($path) {
            return bridge_call($path, ['a' => 2, 'b' => 40]);
        });
        if (!is_array($res) || !isset($res['sum']) || $res['sum'] != 42) {
            fail("bridge_call $path with a=2 b=40", '{"sum":42,...}', json_encode($res));
        }
        echo "ok: bridge_call $path -> sum 42 from worker {$res['worker']}\n";
        exit(0);

    case 'slow':
        $ms = (int) $argv[3];
        $res = call_or_fail("slow call $path", function () use ($path, $ms) {
            return bridge_call($path, ['ms' => $ms]);
        });
        if (!is_array($res) || !isset($res['slept_ms']) || $res['slept_ms'] != $ms) {
            fail("slow call $path", "{\"slept_ms\":$ms,...}", json_encode($res));
        }
        echo "ok: slow call $path answered after {$ms}ms by worker {$res['worker']}\n";
        exit(0);

    case 'error':
        $code = $argv[3];
        $params = isset($argv[4]) ? json_decode($argv[4], true) : [];
        try {
            $res = bridge_call($path, $params);
        } catch (BridgeException $e) {
            if ($e->errorCode !== $code) {
                fail("error from $path", "BridgeException $code", "BridgeException {$e->errorCode}: {$e->getMessage()}");
            }
            if (!preg_match('/^[!-~]{1,128}$/', (string) $e->requestId)) {
                fail("request id of the $code error", 'a request id', json_encode($e->requestId));
            }
            echo "ok: $path threw BridgeException $code (HTTP {$e->status}) request_id={$e->requestId}\n";
            exit(0);
        }
        fail("error from $path", "BridgeException $code", 'a reply: ' . json_encode($res));

    case 'parallel':
        // N slow calls at once through bridge_call_all(): one HTTP/2
        // connection, all answered, in about one call's time.
        $n = (int) $argv[3];
        $ms = (int) $argv[4];
        $calls = array_fill(0, $n, [$path, ['ms' => $ms]]);
        $started = microtime(true);
        $results = bridge_call_all($calls, 35.0, $stats);
        $took = (int) ((microtime(true) - $started) * 1000);
        foreach ($results as $i => $res) {
            if (!is_array($res) || !isset($res['slept_ms']) || $res['slept_ms'] != $ms) {
                $got = $res instanceof BridgeException ? get_class($res) . ' ' . $res->getMessage() : json_encode($res);
                fail("parallel call $i of $n to $path", "{\"slept_ms\":$ms,...}", $got);
            }
        }
        // HTTP/2 on one connection where libcurl can (8.0 and later),
        // else HTTP/1.1 on a connection each (see bridge_call_all()).
        $h2 = bridge_can_multiplex();
        if ($h2 ? [$stats['http2'], $stats['connections']] !== [$n, 1] : $stats['http2'] !== 0) {
            $want = $h2 ? "$n over HTTP/2 on 1 connection" : 'HTTP/1.1';
            fail("$n parallel calls (libcurl " . curl_version()['version'] . ')', $want, "{$stats['http2']} over HTTP/2 on {$stats['connections']} connection(s)");
        }
        if ($took >= $n * $ms / 2) {
            fail("$n parallel calls of {$ms}ms", 'well under ' . ($n * $ms) . 'ms in all', "{$took}ms");
        }
        $how = $h2 ? 'over 1 HTTP/2 connection' : "over HTTP/1.1 (libcurl " . curl_version()['version'] . ' < 8.0)';
        echo "ok: $n calls of {$ms}ms to $path at once $how, all answered in {$took}ms\n";
        exit(0);

    case 'worker':
        // bridge_call_worker() N times to PREFIX/echo (raw bytes) and once
        // to PREFIX/add (JSON): each answer must come from worker ID.
        $id = $argv[3];
        $n = (int) $argv[4];
        for ($i = 0; $i < $n; $i++) {
            $text = "for $id, call $i: " . bin2hex(random_bytes(4));
            $response = null;
            $got = call_or_fail("bridge_call_worker($id, $path/echo)", function () use ($id, $path, $text, &$response) {
                return bridge_call_worker($id, "$path/echo", $text, 'text/plain; charset=utf-8', 35.0, $response);
            });
            $echoed = isset($response['headers']['x-echo-worker']) ? $response['headers']['x-echo-worker'] : '(none)';
            if ($got !== $text || $echoed !== $id) {
                fail("call $i of $n: bridge_call_worker($id, $path/echo)", "x-echo-worker $id and the body back", "x-echo-worker $echoed, body " . json_encode($got));
            }
        }
        $res = call_or_fail("bridge_call_worker($id, $path/add)", function () use ($id, $path) {
            return bridge_call_worker($id, "$path/add", ['a' => 2, 'b' => 40]);
        });
        if (!is_array($res) || !isset($res['sum']) || $res['sum'] != 42 || $res['worker'] !== $id) {
            fail("bridge_call_worker($id, $path/add) with a=2 b=40", "{\"sum\":42,\"worker\":\"$id\"}", json_encode($res));
        }
        echo "ok: bridge_call_worker('$id', ...): $n of $n echoes via $path/echo named $id in x-echo-worker, and $path/add answered {\"sum\":42,\"worker\":\"$id\"}\n";
        exit(0);

    case 'worker-error':
        $id = $argv[3];
        $code = $argv[4];
        $e = expect_error("bridge_call_worker($id, $path)", $code, function () use ($id, $path) {
            return bridge_call_worker($id, $path, 'hello?', 'text/plain');
        });
        echo "ok: bridge_call_worker('$id', '$path') threw BridgeException $code (HTTP {$e->status}) request_id={$e->requestId}\n";
        exit(0);

    case 'workers':
        // bridge_workers(SERVICE, META): exactly the EXPECTed (worker_id,
        // service, metadata) entries, each on node local with its figures.
        $service = $path === '-' ? null : $path;
        $meta = json_decode($argv[3], true);
        $want = json_decode($argv[4], true);
        $what = 'bridge_workers(' . json_encode($service) . ', ' . json_encode($meta) . ')';
        $doc = call_or_fail($what, function () use ($service, $meta) {
            return bridge_workers($service, $meta);
        });
        $key = function (array $w) {
            $m = isset($w['metadata']) ? (array) $w['metadata'] : [];
            ksort($m);
            return json_encode([$w['worker_id'], $w['service'], $m]);
        };
        $wantKeys = array_map($key, $want);
        $haveKeys = array_map($key, $doc['workers']);
        sort($wantKeys);
        sort($haveKeys);
        if ($wantKeys !== $haveKeys || $doc['complete'] !== true || $doc['nodes_missing'] !== []) {
            fail($what, 'complete, no nodes missing, [worker_id, service, metadata] ' . implode(' ', $wantKeys), json_encode($doc));
        }
        foreach ($doc['workers'] as $w) {
            $ok = $w['node'] === 'local'
                && preg_match('/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/', (string) $w['connected_at'])
                && is_int($w['capacity']) && $w['capacity'] >= 1
                && is_int($w['in_flight']) && $w['in_flight'] >= 0 && $w['in_flight'] <= $w['capacity'];
            if (!$ok) {
                fail("$what: the entry of {$w['worker_id']}", 'node local, connected_at in RFC 3339, 0 <= in_flight <= capacity', json_encode($w));
            }
        }
        $listed = array_map(function ($w) {
            return "{$w['worker_id']}@{$w['service']} " . json_encode($w['metadata'], JSON_UNESCAPED_UNICODE);
        }, $doc['workers']);
        echo "ok: $what -> " . (count($listed) ? implode(', ', $listed) : 'none') . "\n";
        exit(0);

    case 'workers-error':
        $meta = json_decode($path, true);
        $code = $argv[3];
        $e = expect_error('bridge_workers(null, ' . json_encode($meta) . ')', $code, function () use ($meta) {
            return bridge_workers(null, $meta);
        });
        echo "ok: bridge_workers(null, " . json_encode($meta) . ") threw BridgeException $code (HTTP {$e->status}) request_id={$e->requestId}\n";
        exit(0);

    case 'fanout':
        // bridge_fanout(PATH, body, SELECTOR): one ok result per worker of IDS.
        $selector = selector_arg($argv[3]);
        $ids = ids_arg($argv[4]);
        $binary = isset($argv[5]) && $argv[5] === 'binary';
        $body = $binary ? random_bytes(3000) : 'fan-out ✓ ' . bin2hex(random_bytes(4));
        $what = "bridge_fanout($path, " . json_encode($selector) . ')';
        $doc = call_or_fail($what, function () use ($path, $body, $selector, $binary) {
            return bridge_fanout($path, $body, $selector, null, $binary ? 'application/octet-stream' : 'text/plain; charset=utf-8');
        });
        $n = count($ids);
        if ($doc['expected'] !== $n || $doc['responded'] !== $n || $doc['complete'] !== true || count($doc['results']) !== $n) {
            fail($what, "expected $n, responded $n, complete, $n results", json_encode(array_diff_key($doc, ['results' => 0])) . ', ' . count($doc['results']) . ' results');
        }
        $got = [];
        foreach ($doc['results'] as $r) {
            $got[] = check_fanout_result($what, $r, $body);
            if ($binary && (!isset($r['body_encoding']) || $r['body_encoding'] !== 'base64')) {
                fail("$what: the binary reply of {$r['worker_id']}", 'body_encoding base64', json_encode(isset($r['body_encoding']) ? $r['body_encoding'] : null));
            }
        }
        sort($got);
        if ($got !== $ids) {
            fail("$what: who answered", implode(',', $ids), implode(',', $got));
        }
        $how = $binary ? strlen($body) . ' random bytes, base64 in the JSON' : json_encode($body, JSON_UNESCAPED_UNICODE);
        echo "ok: $what -> expected $n, responded $n, complete; " . ($n ? 'outcome ok from ' . implode(', ', $ids) . " with the body echoed ($how)" : 'no results') . "\n";
        exit(0);

    case 'fanout-stream':
        // bridge_fanout() with a callback: ndjson, one result per worker as it
        // arrives, then the summary.
        $selector = selector_arg($argv[3]);
        $ids = ids_arg($argv[4]);
        $body = 'streamed ' . bin2hex(random_bytes(4));
        $what = "bridge_fanout($path, " . json_encode($selector) . ', $onResult)';
        $seen = [];
        $summary = call_or_fail($what, function () use ($path, $body, $selector, $what, &$seen) {
            return bridge_fanout($path, $body, $selector, function (array $r) use ($what, $body, &$seen) {
                $seen[] = check_fanout_result("$what: result " . (count($seen) + 1), $r, $body);
            }, 'text/plain');
        });
        $n = count($ids);
        $want = ['expected' => $n, 'responded' => $n, 'complete' => true];
        ksort($summary);
        ksort($want);
        if ($summary !== $want) {
            fail("$what: the summary line", json_encode($want), json_encode($summary));
        }
        sort($seen);
        if ($seen !== $ids) {
            fail("$what: the results streamed", implode(',', $ids), implode(',', $seen) ?: 'none');
        }
        echo "ok: $what streamed $n result line(s) (" . implode(', ', $ids) . ") and the summary " . json_encode($summary) . "\n";
        exit(0);

    case 'fanout-error':
        $selector = selector_arg($argv[3]);
        $code = $argv[4];
        $what = "bridge_fanout($path, " . json_encode($selector) . ')';
        $e = expect_error($what, $code, function () use ($path, $selector) {
            return bridge_fanout($path, 'x', $selector);
        });
        echo "ok: $what threw BridgeException $code (HTTP {$e->status}) request_id={$e->requestId}\n";
        exit(0);

    case 'push':
        // bridge_fanout_push(): 202 and {"expected": N, "sent": N}.
        $selector = selector_arg($argv[3]);
        $n = (int) $argv[4];
        $body = isset($argv[5]) ? $argv[5] : 'push';
        $what = "bridge_fanout_push($path, " . json_encode($selector) . ')';
        $response = null;
        $doc = call_or_fail($what, function () use ($path, $body, $selector, &$response) {
            return bridge_fanout_push($path, $body, $selector, 'application/json', 35.0, $response);
        });
        ksort($doc);
        if ($response['status'] !== 202 || $doc !== ['expected' => $n, 'sent' => $n]) {
            fail($what, "HTTP 202 {\"expected\":$n,\"sent\":$n}", "HTTP {$response['status']} " . json_encode($doc));
        }
        echo "ok: $what -> HTTP 202 " . json_encode($doc) . "\n";
        exit(0);

    case 'job':
        // bridge_submit() then bridge_result(): a JSON body comes back decoded,
        // bytes (not UTF-8, NULs, CR LF) byte for byte, also a result over
        // 1 MiB (which the bridge keeps in a file); run by worker ID.
        $worker = $argv[3];
        $bytes = function ($n) {
            return "\x00\xff\xfe\r\n" . random_bytes($n) . "\x00--";
        };
        $bodies = [
            'JSON' => ['n' => random_int(1, 1 << 40), 'list' => [1, 2.5, 'tr✓s', null, true], 'nested' => ['a' => [], 'b' => ['c' => 'd']]],
            'bytes' => $bytes(70000),
            'large bytes' => $bytes(1200000),
        ];
        foreach ($bodies as $kind => $body) {
            $what = "bridge_submit($path, $kind) then bridge_result";
            $id = check_job_id("$what: the id", call_or_fail($what, function () use ($path, $body) {
                return bridge_submit($path, $body);
            }));
            $response = null;
            $got = call_or_fail("$what($id)", function () use ($id, &$response) {
                return bridge_result($id, 20, $response);
            });
            $h = $response['headers'];
            $echoed = isset($h['x-echo-worker']) ? $h['x-echo-worker'] : null;
            $state = isset($h['wsbridge-job-state']) ? $h['wsbridge-job-state'] : null;
            if ($got !== $body || $response['status'] !== 200 || $echoed !== $worker || $state !== 'succeeded') {
                fail("$what($id)", 'HTTP 200, wsbridge-job-state succeeded, x-echo-worker ' . $worker . ', ' . shown($body),
                    "HTTP {$response['status']}, wsbridge-job-state $state, x-echo-worker $echoed, " . shown($got));
            }
            $doc = call_or_fail("bridge_job($id)", function () use ($id) {
                return bridge_job($id);
            });
            check_job_document("bridge_job($id) after its result", $doc, $id, [
                'state' => 'succeeded', 'status' => 200, 'ran_by' => $worker, 'attempts' => 1,
                'path' => $path, 'method' => 'POST', 'result' => "/_wsbridge/jobs/$id/result",
            ]);
            echo "ok: $what -> job $id succeeded, ran by $worker, the $kind body back as sent (" . shown($body) . ")\n";
        }
        exit(0);

    case 'job-wait':
        // 'wait': the reply within it is the answer to the submission itself,
        // and the job keeps it for bridge_result().
        $text = "within the wait ✓ " . bin2hex(random_bytes(4));
        $what = "bridge_submit($path, text, ['wait' => 5])";
        $response = null;
        $job = call_or_fail($what, function () use ($path, $text, &$response) {
            return bridge_submit($path, $text, 'text/plain; charset=utf-8', ['wait' => 5], 35.0, $response);
        });
        $id = check_job_id("$what: the id", is_array($job) && isset($job['id']) ? $job['id'] : null);
        $h = $response['headers'];
        $where = isset($h['content-location']) ? $h['content-location'] : null;
        if ($job !== ['id' => $id, 'state' => 'succeeded', 'result' => $text] || $response['status'] !== 200 || $where !== "/_wsbridge/jobs/$id") {
            fail($what, "HTTP 200, content-location /_wsbridge/jobs/$id, " . json_encode(['id' => $id, 'state' => 'succeeded', 'result' => $text], JSON_UNESCAPED_UNICODE),
                "HTTP {$response['status']}, content-location $where, " . json_encode($job, JSON_UNESCAPED_UNICODE));
        }
        $again = call_or_fail("bridge_result($id, 0)", function () use ($id) {
            return bridge_result($id, 0);
        });
        if ($again !== $text) {
            fail("bridge_result($id, 0) after the wait", json_encode($text), json_encode($again));
        }
        echo "ok: $what answered at once: HTTP 200, state succeeded, the reply " . json_encode($text, JSON_UNESCAPED_UNICODE) . "; bridge_result($id, 0) gives it again\n";
        exit(0);

    case 'job-late':
        // A reply later than 'wait': 202 and no result yet; bridge_result()
        // with no wait says null, then polls until the reply is there.
        $ms = (int) $argv[3];
        $what = "bridge_submit($path, ['ms' => $ms], ['wait' => 1])";
        $response = null;
        $job = call_or_fail($what, function () use ($path, $ms, &$response) {
            return bridge_submit($path, ['ms' => $ms], 'application/json', ['wait' => 1], 35.0, $response);
        });
        $id = check_job_id("$what: the id", is_array($job) && isset($job['id']) ? $job['id'] : null);
        $where = isset($response['headers']['location']) ? $response['headers']['location'] : null;
        if (!in_array($job['state'], ['queued', 'running'], true) || $job['result'] !== null || $response['status'] !== 202 || $where !== "/_wsbridge/jobs/$id") {
            fail($what, "HTTP 202, location /_wsbridge/jobs/$id, state queued or running, result null", "HTTP {$response['status']}, location $where, " . json_encode($job));
        }
        $now = call_or_fail("bridge_result($id, 0)", function () use ($id, &$response) {
            return bridge_result($id, 0, $response);
        });
        if ($now !== null || $response['status'] !== 202) {
            fail("bridge_result($id, 0) of a running job", 'null (HTTP 202)', json_encode($now) . " (HTTP {$response['status']})");
        }
        $started = microtime(true);
        $res = call_or_fail("bridge_result($id, 30)", function () use ($id) {
            return bridge_result($id, 30);
        });
        $took = (int) ((microtime(true) - $started) * 1000);
        if (!is_array($res) || !isset($res['slept_ms']) || $res['slept_ms'] !== $ms) {
            fail("bridge_result($id, 30)", "{\"slept_ms\":$ms,...}", json_encode($res));
        }
        echo "ok: $what -> HTTP 202, state {$job['state']}; bridge_result($id, 0) null; bridge_result($id, 30) " . json_encode($res) . " after {$took}ms\n";
        exit(0);

    case 'job-idempotent':
        // The same key and body: the same job; the key with another body: refused.
        $key = 'interop-' . bin2hex(random_bytes(8));
        $submit = function ($body, $options) use ($path) {
            return bridge_submit($path, $body, 'text/plain', $options);
        };
        $first = check_job_id('bridge_submit with a key', call_or_fail('bridge_submit with a key', function () use ($submit, $key) {
            return $submit('once', ['idempotency_key' => $key]);
        }));
        $second = call_or_fail('bridge_submit with the same key again', function () use ($submit, $key) {
            return $submit('once', ['idempotency_key' => $key]);
        });
        if ($second !== $first) {
            fail("bridge_submit twice with Idempotency-Key $key", "the same job $first", json_encode($second));
        }
        $other = call_or_fail('bridge_submit without a key', function () use ($submit) {
            return $submit('once', []);
        });
        if ($other === $first) {
            fail('bridge_submit of the same body without a key', "a job other than $first", $other);
        }
        $e = expect_error("bridge_submit with Idempotency-Key $key and another body", 'idempotency_key_mismatch', function () use ($submit, $key) {
            return $submit('twice', ['idempotency_key' => $key]);
        });
        $got = call_or_fail("bridge_result($first)", function () use ($first) {
            return bridge_result($first, 20);
        });
        if ($got !== 'once') {
            fail("bridge_result($first)", '"once"', json_encode($got));
        }
        echo "ok: Idempotency-Key $key: job $first both times (without the key: $other); another body threw idempotency_key_mismatch (HTTP {$e->status})\n";
        exit(0);

    case 'job-cancel':
        // A job for a worker that is not connected waits, queued; cancelled,
        // its result is the error job_cancelled; cancelled again, it is gone.
        $worker = $argv[3];
        $what = "bridge_submit($path, ..., ['worker' => '$worker'])";
        $id = check_job_id($what, call_or_fail($what, function () use ($path, $worker) {
            return bridge_submit($path, 'for nobody', 'text/plain', ['worker' => $worker]);
        }));
        $doc = call_or_fail("bridge_job($id, 1)", function () use ($id) {
            return bridge_job($id, 1); // its state would change within 1 s if it were to
        });
        check_job_document("bridge_job($id, 1) of a job for an absent worker", $doc, $id, ['state' => 'queued', 'worker' => $worker, 'attempts' => 0]);
        $response = null;
        $res = call_or_fail("bridge_result($id, 1)", function () use ($id, &$response) {
            return bridge_result($id, 1, $response);
        });
        if ($res !== null || $response['status'] !== 202) {
            fail("bridge_result($id, 1) of a queued job", 'null (HTTP 202)', json_encode($res) . " (HTTP {$response['status']})");
        }
        $doc = call_or_fail("bridge_cancel($id)", function () use ($id) {
            return bridge_cancel($id);
        });
        check_job_document("bridge_cancel($id)", $doc, $id, ['state' => 'cancelled']);
        $doc = call_or_fail("bridge_job($id)", function () use ($id) {
            return bridge_job($id);
        });
        check_job_document("bridge_job($id) after the cancel", $doc, $id, ['state' => 'cancelled', 'attempts' => 0]);
        if (!isset($doc['error']['code']) || $doc['error']['code'] !== 'job_cancelled') {
            fail("bridge_job($id) after the cancel: its error", '{"code":"job_cancelled",...}', json_encode(isset($doc['error']) ? $doc['error'] : null));
        }
        $e = expect_error("bridge_result($id) of the cancelled job", 'job_cancelled', function () use ($id) {
            return bridge_result($id, 5);
        });
        if ($e->status !== 409 || $e->jobId !== $id) {
            fail("the job_cancelled error of $id", "HTTP 409, jobId $id", "HTTP {$e->status}, jobId " . json_encode($e->jobId));
        }
        $gone = call_or_fail("bridge_cancel($id) again", function () use ($id) {
            return bridge_cancel($id);
        });
        if ($gone !== null) {
            fail("bridge_cancel($id) of an ended job", 'null (deleted, HTTP 204)', json_encode($gone));
        }
        expect_error("bridge_job($id) once deleted", 'job_not_found', function () use ($id) {
            return bridge_job($id);
        });
        echo "ok: job $id for absent worker $worker stayed queued; bridge_cancel -> cancelled; bridge_result threw job_cancelled (HTTP 409); a second bridge_cancel deleted it (job_not_found since)\n";
        exit(0);

    case 'job-errors':
        // Refused (no_route, a callback not allowed), a worker's own 400 as
        // the job's result, and an id the bridge does not know.
        $checks = [
            ['no_route', 'bridge_submit(/nowhere/echo)', function () {
                return bridge_submit('/nowhere/echo', 'x');
            }],
            ['callback_not_allowed', "bridge_submit($path, ..., ['callback' => ...])", function () use ($path) {
                return bridge_submit($path, 'x', 'text/plain', ['callback' => 'http://127.0.0.1:9/hook']);
            }],
            ['job_not_found', 'bridge_result(an unknown id)', function () {
                return bridge_result(bin2hex(random_bytes(16)), 0);
            }],
        ];
        $seen = [];
        foreach ($checks as list($code, $what, $fn)) {
            $e = expect_error($what, $code, $fn);
            $seen[] = "$what: $code (HTTP {$e->status})";
        }
        $id = check_job_id("bridge_submit($path, bad input)", call_or_fail("bridge_submit($path, bad input)", function () use ($path) {
            return bridge_submit($path, ['a' => 'x', 'b' => 1]);
        }));
        $e = expect_error("bridge_result($id): the worker's own 400", 'bad_input', function () use ($id) {
            return bridge_result($id, 20);
        });
        if ($e->status !== 400 || $e->jobId !== $id) {
            fail("the worker's bad_input error of job $id", "HTTP 400, jobId $id", "HTTP {$e->status}, jobId " . json_encode($e->jobId));
        }
        $seen[] = "bridge_result of a job the worker answered 400: bad_input (HTTP 400, jobId $id)";
        echo 'ok: ' . implode('; ', $seen) . "\n";
        exit(0);

    default:
        fwrite(STDERR, "usage: php interop-calls.php probe|text|binary|add|slow|error|parallel|worker|worker-error|workers|workers-error|fanout|fanout-stream|fanout-error|push|job|job-wait|job-late|job-idempotent|job-cancel|job-errors PATH [...]\n");
        exit(2);
}
