<?php
/**
 * What a legacy controller looks like with wsbridge: one line to call the
 * worker, one to return its answer. No polling loop, no Redis, no queue.
 *
 *     php examples/php/app.php 2 3                   # CLI: prints {"sum":5,...}
 *     php -S 127.0.0.1:8000 examples/php/app.php     # then GET /?a=2&b=3
 *
 * Any worker serving the "orders" service with an /orders/add handler will do,
 * e.g. examples/python/worker.py or examples/node/worker.js.
 */
require __DIR__ . '/bridge_call.php';

function add_controller(array $get)
{
    $res = bridge_call('/orders/add', $get);
    return $res;
}

$input = PHP_SAPI === 'cli'
    ? ['a' => isset($argv[1]) ? $argv[1] : 2, 'b' => isset($argv[2]) ? $argv[2] : 3]
    : $_GET;

try {
    $res = add_controller($input);
    if (PHP_SAPI !== 'cli') {
        header('Content-Type: application/json');
    }
    echo json_encode($res), PHP_EOL;
} catch (BridgeException $e) {
    if (PHP_SAPI !== 'cli') {
        http_response_code($e->status ?: 502);
        header('Content-Type: application/json');
    }
    echo json_encode(['error' => $e->errorCode, 'request_id' => $e->requestId, 'message' => $e->getMessage()]), PHP_EOL;
    exit(1);
}
