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
 *
 * Workers by name and metadata (a worker's hello may carry a `worker_id`
 * and `metadata`, e.g. {"region": "eu"}):
 *
 *     $reply = bridge_call_worker('device-42', '/devices/status', ['cmd' => 'status']);
 *     $doc = bridge_fanout('/devices/reload', '', 'region=eu');   // one result per worker
 *     $doc = bridge_workers('devices', ['region' => 'eu']);        // who is connected
 *
 * bridge_call_worker() sends a call to the one worker with that id
 * (Wsbridge-Worker); bridge_fanout() sends it to every worker of the
 * service, or those whose metadata matches (Wsbridge-Fanout), and returns
 * each one's reply; bridge_fanout_push() sends it without waiting for the
 * replies; bridge_workers() lists the connected workers
 * (GET /_wsbridge/workers).
 *
 * Jobs (asynchronous calls; the bridge needs a [jobs] dir): the bridge
 * stores the call, answers at once and runs it; its result is kept for
 * jobs.retention, for this PHP request or a later one to fetch:
 *
 *     $id = bridge_submit('/reports/build', ['month' => '2024-05']);
 *     $report = bridge_result($id, 30);   // null: not finished within 30 s
 *
 * bridge_job() tells a job's state, bridge_cancel() cancels it.
 */

class BridgeException extends RuntimeException
{
    /** @var string bridge error code, e.g. "no_worker" */
    public $errorCode;
    /** @var string the X-Request-Id of the failed call */
    public $requestId;
    /** @var int HTTP status (0 if the bridge could not be reached) */
    public $status;
    /** @var string|null the job's id, for a failure of a job (bridge_result(), ...) */
    public $jobId;

    public function __construct($errorCode, $message, $requestId, $status, $jobId = null)
    {
        parent::__construct("[$errorCode] $message (request $requestId" . ($jobId === null ? '' : ", job $jobId") . ')', $status);
        $this->errorCode = $errorCode;
        $this->requestId = $requestId;
        $this->status = $status;
        $this->jobId = $jobId;
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
    return bridge_call_outcome($call, $reply);
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
            $body = bridge_call_outcome($call, $reply);
            $decoded = json_decode($body, true);
            $results[$i] = ($decoded === null && trim($body) !== 'null') ? $body : $decoded;
        } catch (BridgeException $e) {
            $results[$i] = $e;
        }
    }
    curl_multi_close($multi);
    return $results;
}

/**
 * A call for one worker: the one whose hello named it $workerId, and no
 * other (header Wsbridge-Worker). It must serve the service $path routes to;
 * in a cluster, the call goes to the bridge it is connected to.
 *
 *     $res = bridge_call_worker('device-42', '/devices/status', ['cmd' => 'status']);
 *     // ['state' => 'on', ...]: JSON in, decoded JSON out, as bridge_call()
 *     $png = bridge_call_worker('cam-7', '/cams/snapshot', '', 'text/plain', 35.0, $response);
 *     // raw bytes in and out, as bridge_post(); $response['headers']['content-type']
 *
 * @param string $workerId    the worker's id (its hello's worker_id)
 * @param string $path        e.g. '/devices/status'; the route picks the service
 * @param mixed  $body        a string goes as it is and the raw reply comes back
 *                            (as bridge_post()); anything else goes as JSON and
 *                            the reply comes back decoded (as bridge_call())
 * @param string $contentType the Content-Type of a string body (JSON goes as
 *                            application/json)
 * @param float  $timeout     seconds; keep it above the bridge's request_timeout
 * @param array  $response    set to ['status' => HTTP status, 'headers' =>
 *                            [lower-case name => value]], also when it throws
 * @return mixed the reply body, or the decoded reply for a JSON call
 * @throws BridgeException unknown_worker (no bridge has a worker by that id),
 *                         no_worker (it stayed at capacity), or any other failure
 */
function bridge_call_worker($workerId, $path, $body = [], $contentType = 'application/octet-stream', $timeout = 35.0, &$response = null)
{
    $call = bridge_handle_body($path, $body, $contentType, $timeout, ['Wsbridge-Worker: ' . bridge_header_value($workerId, 'worker id')]);
    $reply = curl_exec($call['ch']);
    $response = bridge_response($call);
    $reply = bridge_call_outcome($call, $reply);
    return is_string($body) ? $reply : bridge_decode($reply);
}

/**
 * Fan-out: the same call to every worker of the service $path routes to, or
 * to those whose metadata holds every pair of $selector, on every bridge of a
 * cluster; once each, never retried. Returns when all have answered or the
 * route's request_timeout has passed, with one result per worker.
 *
 *     $doc = bridge_fanout('/devices/reload', ['full' => true], 'region=eu');
 *     foreach ($doc['results'] as $r) {
 *         if ($r['outcome'] !== 'ok') {          // error, timeout, unavailable, too_large
 *             error_log("{$r['worker_id']}: {$r['outcome']}");
 *             continue;
 *         }
 *         $reply = json_decode(bridge_fanout_body($r), true);   // $r['status'], $r['headers']
 *     }
 *     if (!$doc['complete']) { ... }              // $doc['responded'] < $doc['expected']
 *
 * With $onResult, each result is handed over as it arrives (the bridge
 * answers in application/x-ndjson) and the summary line is returned:
 *
 *     $summary = bridge_fanout('/devices/status', '', 'all', function (array $r) {
 *         echo $r['worker_id'], ' ', $r['outcome'], PHP_EOL;
 *     });   // ['expected' => 3, 'responded' => 3, 'complete' => true]
 *
 * @param string       $path        e.g. '/devices/reload'; the route picks the service
 * @param mixed        $body        a string goes as it is; anything else as JSON
 * @param string|array $selector    'all', 'region=eu,user=42', or
 *                                  ['region' => 'eu', 'user' => '42']
 * @param callable     $onResult    null: wait for the whole document; else
 *                                  called with each result (an array) in turn
 * @param string       $contentType the Content-Type of a string body
 * @param float        $timeout     seconds; keep it above the route's request_timeout
 * @return array {expected, responded, complete, results: [{worker_id, node,
 *               outcome, status, headers, body, body_encoding, error, ms}, ...]}
 *               in order of arrival (headers and body only with a reply;
 *               body_encoding "base64" for a body that is not UTF-8, see
 *               bridge_fanout_body(); a result without a reply has the
 *               bridge's error {code, message, request_id} and status);
 *               with $onResult, {expected, responded, complete}. No matching
 *               worker is no error: expected 0, no results.
 * @throws BridgeException for the call as a whole (bad_request for a bad
 *                         selector, no_route, ...; incomplete for a stream that
 *                         ended before its summary); one worker's failure is
 *                         only its result's outcome. Whatever $onResult throws
 *                         ends the call and is rethrown.
 */
function bridge_fanout($path, $body = '', $selector = 'all', $onResult = null, $contentType = 'application/octet-stream', $timeout = 35.0)
{
    $call = bridge_handle_body($path, $body, $contentType, $timeout, [
            'Wsbridge-Fanout: ' . bridge_selector($selector),
            'Accept: ' . ($onResult === null ? 'application/json' : 'application/x-ndjson'),
        ]);
    if ($onResult !== null) {
        return bridge_fanout_stream($call, $onResult);
    }
    $reply = bridge_call_outcome($call, curl_exec($call['ch']));
    return bridge_fanout_document($call, $reply, 'results');
}

/**
 * A push to every matching worker (fan-out with Wsbridge-Fanout-Reply: none):
 * returns as soon as the bridge has sent the call to each of them; their
 * replies are discarded.
 *
 *     $doc = bridge_fanout_push('/devices/config', ['level' => 'debug'], ['region' => 'eu']);
 *     // ['expected' => 12, 'sent' => 12] (HTTP 202)
 *
 * @param string       $path        e.g. '/devices/config'; the route picks the service
 * @param mixed        $body        a string goes as it is; anything else as JSON
 * @param string|array $selector    as for bridge_fanout()
 * @param string       $contentType the Content-Type of a string body
 * @param float        $timeout     seconds
 * @param array        $response    set to ['status' => 202, 'headers' => [...]]
 * @return array {expected, sent}: matching workers, and calls sent
 * @throws BridgeException for the call as a whole (bad_request, no_route, ...)
 */
function bridge_fanout_push($path, $body = '', $selector = 'all', $contentType = 'application/octet-stream', $timeout = 35.0, &$response = null)
{
    $call = bridge_handle_body($path, $body, $contentType, $timeout, ['Wsbridge-Fanout: ' . bridge_selector($selector), 'Wsbridge-Fanout-Reply: none']);
    $reply = curl_exec($call['ch']);
    $response = bridge_response($call);
    $reply = bridge_call_outcome($call, $reply);
    return bridge_fanout_document($call, $reply, 'sent');
}

/**
 * The reply body of one fan-out result as bytes (a body that is not UTF-8
 * travels base64-encoded in the JSON), or null for a result without a reply.
 *
 *     $bytes = bridge_fanout_body($doc['results'][0]);
 */
function bridge_fanout_body(array $result)
{
    if (!isset($result['body'])) {
        return null;
    }
    if (isset($result['body_encoding']) && $result['body_encoding'] === 'base64') {
        return base64_decode($result['body']);
    }
    return $result['body'];
}

/**
 * The workers connected to the bridge, and in a cluster to every bridge
 * (GET /_wsbridge/workers).
 *
 *     $doc = bridge_workers('devices', ['region' => 'eu']);
 *     foreach ($doc['workers'] as $w) {
 *         echo $w['worker_id'], ' on ', $w['node'], ': ', $w['in_flight'], '/', $w['capacity'], PHP_EOL;
 *     }
 *
 * @param string|null $service only the workers of this service; null: all of
 *                             them, each once per service it serves
 * @param array       $meta    only the workers whose metadata holds every
 *                             pair, e.g. ['region' => 'eu']
 * @param float       $timeout seconds
 * @return array {complete, nodes_missing, workers: [{worker_id, node, service,
 *               metadata, connected_at, in_flight, capacity}, ...]};
 *               complete is false when a bridge of the cluster did not
 *               answer in time (it is named in nodes_missing)
 * @throws BridgeException bad_request for a metadata key the bridge does not
 *                         take, or any other failure
 */
function bridge_workers($service = null, array $meta = [], $timeout = 10.0)
{
    $query = [];
    if ($service !== null) {
        $query['service'] = $service;
    }
    foreach ($meta as $key => $value) {
        $query['meta.' . $key] = $value;
    }
    $path = '/_wsbridge/workers' . ($query ? '?' . http_build_query($query, '', '&', PHP_QUERY_RFC3986) : '');
    $call = bridge_handle($path, null, null, $timeout, (bool) getenv('WSBRIDGE_HTTP2'));
    $reply = bridge_call_outcome($call, curl_exec($call['ch']));
    $doc = json_decode($reply, true);
    if (!is_array($doc) || !isset($doc['workers']) || !is_array($doc['workers'])) {
        throw new BridgeException('bad_response', 'not a list of workers: ' . bridge_excerpt($reply), bridge_request_id($call), bridge_response($call)['status']);
    }
    return $doc;
}

/**
 * An asynchronous call, a job (Prefer: respond-async): the bridge stores the
 * call, answers at once with the job's id and runs it; bridge_result()
 * fetches the reply, from this PHP request or a later one, for as long as
 * the bridge keeps it (jobs.retention). Needs a bridge with a [jobs] dir.
 *
 *     $id = bridge_submit('/reports/build', ['month' => '2024-05']);
 *     // ... later, in this request or another:
 *     $report = bridge_result($id);            // ['rows' => ...], or null: not yet
 *
 * With 'wait', a reply ready within that many seconds comes back at once
 * (the bridge waits at most the route's request_timeout):
 *
 *     $job = bridge_submit('/thumbs/make', $jpeg, 'image/jpeg', ['wait' => 5]);
 *     if ($job['state'] === 'succeeded') {
 *         $thumb = $job['result'];             // as bridge_result() returns it
 *     } else {                                 // queued or running
 *         $thumb = bridge_result($job['id'], 60);
 *     }
 *
 * @param string $path        e.g. '/reports/build'; the route picks the service
 * @param mixed  $body        a string goes as it is; anything else as JSON
 * @param string $contentType the Content-Type of a string body (JSON goes as
 *                            application/json)
 * @param array  $options     'wait' => N: whole seconds to wait for the reply;
 *                            then the return value is an array (below);
 *                            'idempotency_key' => K: the same key with the same
 *                            method, path and body gives back the same job (with
 *                            another body: idempotency_key_mismatch);
 *                            'worker' => ID: only the worker whose hello named it
 *                            runs the job, which waits for it to connect (up to
 *                            jobs.queue_timeout);
 *                            'callback' => URL: where the bridge POSTs the result
 *                            when the job ends (a prefix in jobs.callback_allow)
 * @param float  $timeout     seconds for the submission (at least 'wait' + 5)
 * @param array  $response    set to ['status' => HTTP status, 'headers' =>
 *                            [lower-case name => value]] of the answer: 202 and
 *                            the job's location, or the worker's reply under
 *                            'wait'; also when it throws
 * @return string|array the job's id (32 hex digits); with 'wait', ['id' => the
 *               job's id, 'state' => 'succeeded' if it ended within the wait,
 *               else queued or running, 'result' => the reply as bridge_result()
 *               returns it, or null if the job has not ended]
 * @throws BridgeException when the bridge takes no job: no_route, bad_request,
 *                         idempotency_key_mismatch, callback_not_allowed,
 *                         jobs_full, ...; not_async when it ran the call as a
 *                         plain call instead (a bridge without a [jobs] dir);
 *                         under 'wait', for a job that failed within it, as
 *                         bridge_result() does
 */
function bridge_submit($path, $body = '', $contentType = 'application/octet-stream', array $options = [], $timeout = 35.0, &$response = null)
{
    $headerOf = ['idempotency_key' => 'Idempotency-Key', 'worker' => 'Wsbridge-Worker', 'callback' => 'Wsbridge-Callback'];
    $unknown = array_diff(array_keys($options), array_merge(['wait'], array_keys($headerOf)));
    if ($unknown) {
        throw new InvalidArgumentException('unknown bridge_submit() option: ' . implode(', ', $unknown));
    }
    $wait = isset($options['wait']) ? $options['wait'] : null;
    $prefer = 'respond-async';
    if ($wait !== null) {
        if (!is_int($wait) || $wait < 0) {
            throw new InvalidArgumentException('wait must be whole seconds, 0 or more: ' . json_encode($wait));
        }
        $prefer .= ", wait=$wait";
        $timeout = max($timeout, $wait + 5);
    }
    $headers = ['Prefer: ' . $prefer];
    foreach ($headerOf as $option => $name) {
        if (isset($options[$option])) {
            $headers[] = "$name: " . bridge_header_value($options[$option], $option);
        }
    }
    $call = bridge_handle_body($path, $body, $contentType, $timeout, $headers);
    $reply = curl_exec($call['ch']);
    $response = bridge_response($call);
    if (isset($response['headers']['wsbridge-job-state'], $response['headers']['content-location'])) {
        // The job ended within 'wait': this is its result.
        $id = basename($response['headers']['content-location']);
        $result = bridge_job_outcome($call, $reply, $id);
        return $wait === null ? $id : ['id' => $id, 'state' => $response['headers']['wsbridge-job-state'], 'result' => $result];
    }
    $reply = bridge_call_outcome($call, $reply);
    $doc = json_decode($reply, true);
    if ($response['status'] !== 202 || !isset($response['headers']['location']) || !is_array($doc) || !isset($doc['id'], $doc['state'])) {
        throw new BridgeException('not_async', "the bridge made no job and answered the call itself (HTTP {$response['status']}; has it a [jobs] dir?): " . bridge_excerpt($reply), bridge_request_id($call), $response['status']);
    }
    return $wait === null ? $doc['id'] : ['id' => $doc['id'], 'state' => $doc['state'], 'result' => null];
}

/**
 * The reply of a job (bridge_submit()), once it has ended: waits up to $wait
 * seconds for that (the bridge holds each poll up to 50 s), then returns what
 * the worker answered (the bridge keeps its status, headers and body as they
 * came).
 *
 *     $report = bridge_result($id, 30, $response);
 *     if ($report === null) { ... }           // still queued or running: ask again later
 *     // $response['status'], $response['headers']['content-type'], ...
 *
 * @param string    $id       the job's id, as bridge_submit() returned it
 * @param int|float $wait     seconds to wait for the job to end; 0 asks once
 * @param array     $response set to ['status' => HTTP status (the worker's,
 *                            or 202 for a job that has not ended), 'headers'
 *                            => [lower-case name => value]], also when it throws
 * @return mixed the reply: decoded for a JSON reply (Content-Type
 *               application/json or ...+json), as bridge_call() does; any
 *               other as its bytes, as bridge_post() does; null if the job has
 *               not ended within $wait
 * @throws BridgeException with the code the job ended with: job_cancelled,
 *                         job_expired, worker_lost, timeout, ...; the worker's
 *                         own error for a reply with a status >= 400 (as
 *                         bridge_call()); job_not_found for an id the bridge
 *                         does not know (or no longer keeps). Its jobId is $id.
 */
function bridge_result($id, $wait = 30, &$response = null)
{
    $path = bridge_job_path($id) . '/result';
    $deadline = microtime(true) + $wait;
    do {
        $started = microtime(true);
        $poll = (int) min(50, max(0, ceil($deadline - $started)));
        $call = bridge_handle($path . ($poll ? "?wait=$poll" : ''), null, null, $poll + 10, (bool) getenv('WSBRIDGE_HTTP2'));
        $reply = curl_exec($call['ch']);
        $response = bridge_response($call);
        if (isset($response['headers']['wsbridge-job-state'])) {
            return bridge_job_outcome($call, $reply, $id);
        }
        // Not ended: 202 and the job's document. A poll answered before its
        // wait was up (a job the bridge is not running yet) is retried after
        // Retry-After, not at once.
        bridge_job_document($call, bridge_call_outcome($call, $reply, $id), 202);
        $left = $deadline - microtime(true);
        if ($left > 0 && microtime(true) - $started < $poll) {
            usleep((int) (min($left, bridge_retry_after($response)) * 1e6));
        }
    } while (microtime(true) < $deadline);
    return null;
}

/**
 * A job's document (GET /_wsbridge/jobs/<id>): its state and what is known
 * of its run.
 *
 *     $job = bridge_job($id);
 *     echo $job['state'];   // queued, running, succeeded, failed, cancelled, expired
 *
 * @param string $id   the job's id
 * @param int    $wait seconds (up to 50) to wait for its state to change
 *                     first; 0 answers at once
 * @return array {id, state, service, method, path, request_id, created_at,
 *               attempts, location} and, once known, worker, ran_by, node,
 *               started_at, finished_at, expires_at, status (the worker's),
 *               error {code, message}, result (where bridge_result() reads),
 *               callback {delivered, attempts}
 * @throws BridgeException job_not_found, or any other failure
 */
function bridge_job($id, $wait = 0)
{
    $wait = (int) $wait;
    $call = bridge_handle(bridge_job_path($id) . ($wait > 0 ? "?wait=$wait" : ''), null, null, min($wait, 50) + 10, (bool) getenv('WSBRIDGE_HTTP2'));
    $reply = bridge_call_outcome($call, curl_exec($call['ch']), $id);
    return bridge_job_document($call, $reply, 200);
}

/**
 * Cancels a job that has not ended (DELETE /_wsbridge/jobs/<id>): a queued
 * job never runs, a running one's worker is told to cancel it; its result
 * is then the error job_cancelled. A job that had ended is deleted, result
 * and all.
 *
 *     $job = bridge_cancel($id);   // $job['state'] === 'cancelled'
 *
 * @param string $id the job's id
 * @return array|null the job's document (state cancelled, or how it ended if
 *                    it ended first); null for a job that had ended and is
 *                    now deleted
 * @throws BridgeException job_not_found, or any other failure
 */
function bridge_cancel($id)
{
    $call = bridge_handle(bridge_job_path($id), null, null, 15.0, (bool) getenv('WSBRIDGE_HTTP2'));
    curl_setopt($call['ch'], CURLOPT_CUSTOMREQUEST, 'DELETE');
    $reply = bridge_call_outcome($call, curl_exec($call['ch']), $id);
    if (bridge_response($call)['status'] === 204) {
        return null;
    }
    return bridge_job_document($call, $reply, 200);
}

/** Whether this libcurl multiplexes calls over one HTTP/2 connection. */
function bridge_can_multiplex()
{
    $curl = curl_version();
    return ($curl['features'] & CURL_VERSION_HTTP2) !== 0
        && version_compare($curl['version'], '8.0.0', '>=');
}

/**
 * bridge_handle() for a body that is sent as it is when it is a string, and
 * as JSON otherwise; HTTP/2 when WSBRIDGE_HTTP2 is set.
 */
function bridge_handle_body($path, $body, $contentType, $timeout, array $extraHeaders)
{
    $json = !is_string($body);
    return bridge_handle(
        $path,
        $json ? json_encode($body) : $body,
        $json ? 'application/json' : $contentType,
        $timeout,
        (bool) getenv('WSBRIDGE_HTTP2'),
        $extraHeaders
    );
}

/**
 * A curl handle for one call, with what bridge_call_outcome() needs: a POST of
 * $body, or a GET when $body is null. $extraHeaders are more request header
 * lines ('Wsbridge-Worker: w-1', ...).
 */
function bridge_handle($path, $body, $contentType, $timeout, $http2, array $extraHeaders = [])
{
    $base = getenv('WSBRIDGE_HTTP') ?: 'http://127.0.0.1:8080';
    $call = [
        'base' => $base,
        'request_id' => bin2hex(random_bytes(8)),
        'headers' => new ArrayObject(),
    ];
    $ch = curl_init(rtrim($base, '/') . $path);
    $headers = $call['headers'];
    $requestHeaders = ['X-Request-Id: ' . $call['request_id']];
    if ($body === null) {
        curl_setopt($ch, CURLOPT_HTTPGET, true);
    } else {
        curl_setopt_array($ch, [CURLOPT_POST => true, CURLOPT_POSTFIELDS => $body]);
        $requestHeaders[] = 'Content-Type: ' . $contentType;
        $requestHeaders[] = 'Expect:'; // no 100-continue round trip for larger bodies
    }
    curl_setopt_array($ch, [
        CURLOPT_HTTPHEADER => array_merge($requestHeaders, $extraHeaders),
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

/**
 * The reply body of a finished call, or its BridgeException ($jobId: the
 * job the call is about, unless the bridge's error names it).
 */
function bridge_call_outcome(array $call, $reply, $jobId = null)
{
    $ch = $call['ch'];
    $base = $call['base'];
    $status = (int) curl_getinfo($ch, CURLINFO_RESPONSE_CODE);
    $curlError = curl_error($ch);
    $headers = $call['headers'];
    $requestId = isset($headers['x-request-id']) ? $headers['x-request-id'] : $call['request_id'];
    if ($reply === false) {
        throw new BridgeException('unreachable', "cannot reach wsbridge at $base: $curlError", $requestId, 0, $jobId);
    }
    if ($status >= 400) {
        $decoded = json_decode($reply, true);
        if (is_array($decoded) && isset($decoded['error']['code'])) {
            $e = $decoded['error'];
            $message = isset($e['message']) ? $e['message'] : '';
            $jobId = isset($e['job_id']) ? $e['job_id'] : $jobId;
            throw new BridgeException($e['code'], $message, isset($e['request_id']) ? $e['request_id'] : $requestId, $status, $jobId);
        }
        throw new BridgeException('http_' . $status, substr($reply, 0, 200), $requestId, $status, $jobId);
    }
    return $reply;
}

/** Status and headers of a finished call: ['status' => int, 'headers' => [lower-case name => value]]. */
function bridge_response(array $call)
{
    return [
        'status' => (int) curl_getinfo($call['ch'], CURLINFO_RESPONSE_CODE),
        'headers' => $call['headers']->getArrayCopy(),
    ];
}

/** The request id of a call: the bridge's X-Request-Id, else the one we sent. */
function bridge_request_id(array $call)
{
    return isset($call['headers']['x-request-id']) ? $call['headers']['x-request-id'] : $call['request_id'];
}

/** Where the bridge keeps job $id: /_wsbridge/jobs/<id>. */
function bridge_job_path($id)
{
    if (!is_string($id) || !preg_match('/^[0-9a-f]{32}$/i', $id)) {
        throw new InvalidArgumentException('a job id is 32 hex digits: ' . json_encode($id));
    }
    return '/_wsbridge/jobs/' . $id;
}

/**
 * An ended job's result (its /result, or the answer to a submission with
 * 'wait'): the reply, decoded if it is JSON, or its BridgeException.
 */
function bridge_job_outcome(array $call, $reply, $id)
{
    $body = bridge_call_outcome($call, $reply, $id);
    $type = isset($call['headers']['content-type']) ? $call['headers']['content-type'] : '';
    return preg_match('~^application/([!#$&^_.+\w-]+\+)?json\s*(;|$)~i', $type) ? bridge_decode($body) : $body;
}

/** The seconds of a Retry-After header (delay form), 1 if it has none. */
function bridge_retry_after(array $response)
{
    $value = isset($response['headers']['retry-after']) ? $response['headers']['retry-after'] : '';
    return preg_match('/^\d+$/', $value) ? max(1, (int) $value) : 1;
}

/** A job's document decoded (answered with $status), or BridgeException. */
function bridge_job_document(array $call, $reply, $status)
{
    $doc = json_decode($reply, true);
    $got = bridge_response($call)['status'];
    if ($got !== $status || !is_array($doc) || !isset($doc['id'], $doc['state'])) {
        throw new BridgeException('bad_response', "not a job's document (HTTP $got): " . bridge_excerpt($reply), bridge_request_id($call), $got);
    }
    return $doc;
}

/** A reply decoded from JSON, or the raw reply if it is not JSON. */
function bridge_decode($body)
{
    $decoded = json_decode($body, true);
    return ($decoded === null && trim($body) !== 'null') ? $body : $decoded;
}

/** The start of a body for a message: text as it is, other bytes by their length. */
function bridge_excerpt($body)
{
    if (preg_match('//u', $body) !== 1) {
        return strlen($body) . ' bytes that are not UTF-8';
    }
    return strlen($body) > 200 ? substr($body, 0, 200) . '...' : $body;
}

/** $value for a request header, refused if it could end the header line. */
function bridge_header_value($value, $what)
{
    $value = (string) $value;
    if ($value === '' || preg_match('/[\x00-\x1f\x7f]/', $value)) {
        throw new InvalidArgumentException("$what must be non-empty, without control characters: " . json_encode($value));
    }
    return $value;
}

/** A Wsbridge-Fanout value: 'all', 'k=v,k=v', or from ['k' => 'v', ...]. */
function bridge_selector($selector)
{
    if (is_array($selector)) {
        if (!$selector) {
            throw new InvalidArgumentException('an empty selector: "all" selects every worker');
        }
        $pairs = [];
        foreach ($selector as $key => $value) {
            if (strpos($key . $value, ',') !== false) {
                throw new InvalidArgumentException("a selector pair cannot hold a comma: $key=$value");
            }
            $pairs[] = "$key=$value";
        }
        $selector = implode(',', $pairs);
    }
    return bridge_header_value($selector, 'fan-out selector');
}

/** A fan-out reply decoded: a JSON document holding $key, or BridgeException. */
function bridge_fanout_document(array $call, $reply, $key)
{
    $doc = json_decode($reply, true);
    if (!is_array($doc) || !array_key_exists('expected', $doc) || !array_key_exists($key, $doc)) {
        // e.g. a bridge without fan-out, which sent the call to one worker
        throw new BridgeException('bad_response', 'not a fan-out answer: ' . bridge_excerpt($reply), bridge_request_id($call), bridge_response($call)['status']);
    }
    return $doc;
}

/** Runs a fan-out call answered in ndjson: $onResult per result, returns the summary. */
function bridge_fanout_stream(array $call, $onResult)
{
    $ch = $call['ch'];
    $state = new stdClass();
    $state->stream = null;   // whether the answer is an ndjson stream; known at the first byte
    $state->buffer = '';     // an unfinished line
    $state->raw = '';        // the whole body of an answer that is not a stream
    $state->summary = null;
    $state->error = null;    // what a line or $onResult threw
    $headers = $call['headers'];
    curl_setopt($ch, CURLOPT_WRITEFUNCTION, function ($ch, $data) use ($call, $headers, $state, $onResult) {
        if ($state->stream === null) {
            $type = isset($headers['content-type']) ? $headers['content-type'] : '';
            $state->stream = curl_getinfo($ch, CURLINFO_RESPONSE_CODE) === 200
                && stripos($type, 'application/x-ndjson') === 0;
        }
        if (!$state->stream) {
            $state->raw .= $data;
            return strlen($data);
        }
        $state->buffer .= $data;
        try {
            while (($end = strpos($state->buffer, "\n")) !== false) {
                $line = substr($state->buffer, 0, $end);
                $state->buffer = substr($state->buffer, $end + 1);
                bridge_fanout_line($call, $line, $state, $onResult);
            }
        } catch (Throwable $e) {
            $state->error = $e;
            return 0; // ends the transfer
        }
        return strlen($data);
    });
    $ok = curl_exec($ch);
    if ($state->error !== null) {
        throw $state->error;
    }
    $status = bridge_response($call)['status'];
    if (!$state->stream) {
        $reply = bridge_call_outcome($call, $ok === false ? false : $state->raw); // throws for an error status
        throw new BridgeException('bad_response', 'not an ndjson fan-out answer: ' . bridge_excerpt($reply), bridge_request_id($call), $status);
    }
    if ($ok !== false && $state->buffer !== '') {
        bridge_fanout_line($call, $state->buffer, $state, $onResult); // a last line without "\n"
    }
    if ($ok === false || $state->summary === null) {
        $why = $ok === false ? curl_error($ch) : 'no summary line';
        throw new BridgeException('incomplete', "the fan-out stream ended early: $why", bridge_request_id($call), $status);
    }
    return $state->summary;
}

/** One line of an ndjson fan-out answer: a result for $onResult, or the summary. */
function bridge_fanout_line(array $call, $line, $state, $onResult)
{
    if (trim($line) === '') {
        return;
    }
    $item = json_decode($line, true);
    if (!is_array($item)) {
        throw new BridgeException('bad_response', 'unreadable line in the fan-out stream: ' . bridge_excerpt($line), bridge_request_id($call), 200);
    }
    if (isset($item['outcome'])) {
        $onResult($item);
    } elseif (array_key_exists('expected', $item)) {
        $state->summary = $item;
    } else {
        throw new BridgeException('bad_response', 'neither a result nor a summary in the fan-out stream: ' . bridge_excerpt($line), bridge_request_id($call), 200);
    }
}
