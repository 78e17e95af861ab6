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
 *
 * bridge_call_all() makes several calls at once and waits for all of them.
 * With libcurl 8.0 or later (and HTTP/2 support, as distributions build it)
 * they share one HTTP/2 connection to the bridge; older libcurl (Debian 12
 * has 7.88.1) fails every stream after the first on a reused HTTP/2
 * prior-knowledge connection (curl issue #10634, fixed in 8.0), so there the
 * calls go over HTTP/1.1, one connection each, still all at once.
 * WSBRIDGE_HTTP2=1 makes single calls use HTTP/2 as well.
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
    $call = bridge_handle($path, $body, $contentType, $timeout, (bool) getenv('WSBRIDGE_HTTP2'));
    $reply = curl_exec($call['ch']);
    return bridge_result($call, $reply);
}

/**
 * Several calls at once, over one HTTP/2 connection; waits for all of them.
 *
 * @param array $calls   [[$path, $params], ...] (params as for bridge_call)
 * @param float $timeout seconds, for each call
 * @param array $stats   set to ['connections' => how many connections were
 *                       opened, 'http2' => how many calls went over HTTP/2]
 * @return array one entry per call, in order: the decoded reply, or the
 *               BridgeException for that call (returned, not thrown)
 */
function bridge_call_all(array $calls, $timeout = 35.0, &$stats = null)
{
    $http2 = bridge_can_multiplex();
    $multi = curl_multi_init();
    curl_multi_setopt($multi, CURLMOPT_PIPELINING, CURLPIPE_MULTIPLEX);
    $handles = [];
    foreach ($calls as $i => $call) {
        list($path, $params) = $call;
        $handles[$i] = bridge_handle($path, json_encode($params), 'application/json', $timeout, $http2);
        if ($http2) {
            // Share the first connection rather than opening one per call.
            curl_setopt($handles[$i]['ch'], CURLOPT_PIPEWAIT, true);
        }
        curl_multi_add_handle($multi, $handles[$i]['ch']);
    }
    do {
        $status = curl_multi_exec($multi, $running);
        if ($running) {
            curl_multi_select($multi, 1.0);
        }
    } while ($running && $status === CURLM_OK);
    // A transfer's own error is reported here, not by curl_errno().
    $failed = [];
    while ($message = curl_multi_info_read($multi)) {
        if ($message['result'] !== CURLE_OK) {
            $failed[(int) $message['handle']] = true;
        }
    }
    $stats = ['connections' => 0, 'http2' => 0];
    $results = [];
    foreach ($handles as $i => $call) {
        $stats['connections'] += curl_getinfo($call['ch'], CURLINFO_NUM_CONNECTS);
        if (curl_getinfo($call['ch'], CURLINFO_HTTP_VERSION) === CURL_HTTP_VERSION_2_0) {
            $stats['http2']++;
        }
        $reply = isset($failed[(int) $call['ch']]) ? false : curl_multi_getcontent($call['ch']);
        curl_multi_remove_handle($multi, $call['ch']);
        try {
            $body = bridge_result($call, $reply);
            $decoded = json_decode($body, true);
            $results[$i] = ($decoded === null && trim($body) !== 'null') ? $body : $decoded;
        } catch (BridgeException $e) {
            $results[$i] = $e;
        }
    }
    curl_multi_close($multi);
    return $results;
}

/** Whether this libcurl multiplexes calls over one HTTP/2 connection. */
function bridge_can_multiplex()
{
    $curl = curl_version();
    return ($curl['features'] & CURL_VERSION_HTTP2) !== 0
        && version_compare($curl['version'], '8.0.0', '>=');
}

/** A curl handle for one call, with what bridge_result() needs. */
function bridge_handle($path, $body, $contentType, $timeout, $http2)
{
    $base = getenv('WSBRIDGE_HTTP') ?: 'http://127.0.0.1:8080';
    $call = [
        'base' => $base,
        'request_id' => bin2hex(random_bytes(8)),
        'headers' => new ArrayObject(),
    ];
    $ch = curl_init(rtrim($base, '/') . $path);
    $headers = $call['headers'];
    curl_setopt_array($ch, [
        CURLOPT_POST => true,
        CURLOPT_POSTFIELDS => $body,
        CURLOPT_HTTPHEADER => [
            'Content-Type: ' . $contentType,
            'X-Request-Id: ' . $call['request_id'],
            'Expect:', // no 100-continue round trip for larger bodies
        ],
        CURLOPT_RETURNTRANSFER => true,
        CURLOPT_TIMEOUT_MS => (int) ($timeout * 1000),
        CURLOPT_HEADERFUNCTION => function ($ch, $line) use ($headers) {
            $parts = explode(':', $line, 2);
            if (count($parts) === 2) {
                $headers[strtolower(trim($parts[0]))] = trim($parts[1]);
            }
            return strlen($line);
        },
    ]);
    if ($http2) {
        curl_setopt($ch, CURLOPT_HTTP_VERSION, CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE);
    }
    $call['ch'] = $ch;
    return $call;
}

/** The reply body of a finished call, or its BridgeException. */
function bridge_result(array $call, $reply)
{
    $ch = $call['ch'];
    $base = $call['base'];
    $status = (int) curl_getinfo($ch, CURLINFO_RESPONSE_CODE);
    $curlError = curl_error($ch);
    $headers = $call['headers'];
    $requestId = isset($headers['x-request-id']) ? $headers['x-request-id'] : $call['request_id'];
    if ($reply === false) {
        throw new BridgeException('unreachable', "cannot reach wsbridge at $base: $curlError", $requestId, 0);
    }
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
