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

    default:
        fwrite(STDERR, "usage: php interop-calls.php probe|text|binary|add|slow|error|parallel|worker|worker-error|workers|workers-error|fanout|fanout-stream|fanout-error|push PATH [...]\n");
        exit(2);
}
