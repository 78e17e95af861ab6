<?php
/**
 * bridge_call(): a synchronous call to a worker behind wsbridge, for legacy
 * PHP code. Plain curl, no extensions beyond ext-curl and ext-json.
 *
 *     require 'bridge_call.php';
 *     $res = bridge_call('/orders/add', ['a' => 2, 'b' => 3]);   // ['sum' => 5, ...]
 *
 * The bridge listens on loopback (WSBRIDGE_HTTP, default http://127.0.0.1:8080);
 * the call blocks until the worker replies or the bridge gives up. Failures
 * raise BridgeException carrying the bridge's error code (no_worker, timeout,
 * worker_lost, ...) and the request id to grep for in both sides' logs.
 * bridge_post() is the same call with a raw body (binary, text, ...).
 */

class BridgeException extends RuntimeException
{
    /** @var string bridge error code, e.g. "no_worker" */
    public $errorCode;
    /** @var string the X-Request-Id of the failed call */
    public $requestId;
    /** @var int HTTP status (0 if the bridge could not be reached) */
    public $status;

    public function __construct($errorCode, $message, $requestId, $status)
    {
        parent::__construct("[$errorCode] $message (request $requestId)", $status);
        $this->errorCode = $errorCode;
        $this->requestId = $requestId;
        $this->status = $status;
    }
}

/**
 * POST $params as JSON to $path on the bridge and return the decoded JSON reply.
 *
 * @param string $path    e.g. '/orders/add'; the route picks the service
 * @param mixed  $params  anything json_encode() accepts
 * @param float  $timeout seconds; keep it above the bridge's request_timeout
 * @return mixed the decoded reply (the raw body if it is not JSON)
 * @throws BridgeException on any bridge or worker failure
 */
function bridge_call($path, $params = [], $timeout = 35.0)
{
    $body = bridge_post($path, json_encode($params), 'application/json', $timeout);
    $decoded = json_decode($body, true);
    if ($decoded === null && trim($body) !== 'null') {
        return $body; // not JSON: hand back the raw reply
    }
    return $decoded;
}

/**
 * POST a raw body to $path on the bridge and return the raw reply body.
 *
 * @param string $path        e.g. '/files/store'
 * @param string $body        bytes, sent as they are
 * @param string $contentType the request's Content-Type
 * @param float  $timeout     seconds; keep it above the bridge's request_timeout
 * @return string the reply body
 * @throws BridgeException on any bridge or worker failure (status >= 400)
 */
function bridge_post($path, $body, $contentType = 'application/octet-stream', $timeout = 35.0)
{
    $base = getenv('WSBRIDGE_HTTP') ?: 'http://127.0.0.1:8080';
    $requestId = bin2hex(random_bytes(8));
    $ch = curl_init(rtrim($base, '/') . $path);
    $headers = [];
    curl_setopt_array($ch, [
        CURLOPT_POST => true,
        CURLOPT_POSTFIELDS => $body,
        CURLOPT_HTTPHEADER => [
            'Content-Type: ' . $contentType,
            'X-Request-Id: ' . $requestId,
            'Expect:', // no 100-continue round trip for larger bodies
        ],
        CURLOPT_RETURNTRANSFER => true,
        CURLOPT_TIMEOUT_MS => (int) ($timeout * 1000),
        CURLOPT_HEADERFUNCTION => function ($ch, $line) use (&$headers) {
            $parts = explode(':', $line, 2);
            if (count($parts) === 2) {
                $headers[strtolower(trim($parts[0]))] = trim($parts[1]);
            }
            return strlen($line);
        },
    ]);
    $reply = curl_exec($ch);
    $status = (int) curl_getinfo($ch, CURLINFO_RESPONSE_CODE);
    $curlError = curl_error($ch);
    curl_close($ch);

    if ($reply === false) {
        throw new BridgeException('unreachable', "cannot reach wsbridge at $base: $curlError", $requestId, 0);
    }
    $requestId = isset($headers['x-request-id']) ? $headers['x-request-id'] : $requestId;
    if ($status >= 400) {
        $decoded = json_decode($reply, true);
        if (is_array($decoded) && isset($decoded['error']['code'])) {
            $e = $decoded['error'];
            $message = isset($e['message']) ? $e['message'] : '';
            throw new BridgeException($e['code'], $message, isset($e['request_id']) ? $e['request_id'] : $requestId, $status);
        }
        throw new BridgeException('http_' . $status, substr($reply, 0, 200), $requestId, $status);
    }
    return $reply;
}
