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

    default:
        fwrite(STDERR, "usage: php interop-calls.php probe|text|binary|add|slow|error|parallel PATH [...]\n");
        exit(2);
}
