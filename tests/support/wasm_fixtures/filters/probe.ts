// A probe filter for envoy-sidecar's differential suite: it calls the proxy-wasm host functions directly
// (their raw return codes are the point) and reports what it saw in response headers, so one module run
// through real Envoy and through the host shows every difference. Driven by request headers:
//   x-probe: comma list of probes (props, metrics, shared, queue, ffi, grpc, misc, setprop, reqmaps)
//   x-props: comma list of property paths (dots become NUL separators) read in both header phases
//   x-req-body / x-resp-body: what the body callbacks do (trace, buffer, end-replace, grow, shrink, local)
//   x-req-headers: what on_request_headers returns (stop, stop-all, stop-watermark, continue-end)
//   x-callout: cluster|path|timeout_ms of an HTTP callout made from the request headers
// Compiled against two SDKs: the build replaces SDK_PROXY, SDK_RUNTIME and CALLBACK_CONTEXT.
export * from "SDK_PROXY";
import {
  BaseContext, Context, FilterDataStatusValues, FilterHeadersStatusValues, GrpcStatusValues, HeaderPair, Headers, RootContext,
  registerRootContext, send_local_response, stream_context,
} from "SDK_RUNTIME";

// @ts-ignore: decorator
@external("env", "proxy_get_property")
declare function h_get_property(p: usize, n: usize, rp: usize, rn: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_set_property")
declare function h_set_property(p: usize, n: usize, v: usize, vn: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_define_metric")
declare function h_define_metric(t: u32, p: usize, n: usize, rid: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_increment_metric")
declare function h_increment_metric(id: u32, d: i64): u32;
// @ts-ignore: decorator
@external("env", "proxy_record_metric")
declare function h_record_metric(id: u32, v: u64): u32;
// @ts-ignore: decorator
@external("env", "proxy_get_metric")
declare function h_get_metric(id: u32, rv: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_get_shared_data")
declare function h_get_shared(k: usize, kn: usize, rp: usize, rn: usize, rcas: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_set_shared_data")
declare function h_set_shared(k: usize, kn: usize, v: usize, vn: usize, cas: u32): u32;
// @ts-ignore: decorator
@external("env", "proxy_register_shared_queue")
declare function h_register_queue(p: usize, n: usize, rid: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_resolve_shared_queue")
declare function h_resolve_queue(vp: usize, vn: usize, p: usize, n: usize, rid: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_enqueue_shared_queue")
declare function h_enqueue(id: u32, p: usize, n: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_dequeue_shared_queue")
declare function h_dequeue(id: u32, rp: usize, rn: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_call_foreign_function")
declare function h_foreign(np: usize, nn: usize, ap: usize, an: usize, rp: usize, rn: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_grpc_call")
declare function h_grpc_call(
  sp: usize, sn: usize, svp: usize, svn: usize, mp: usize, mn: usize, mdp: usize, mdn: usize, gp: usize, gn: usize,
  timeout: u32, rid: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_grpc_stream")
declare function h_grpc_stream(
  sp: usize, sn: usize, svp: usize, svn: usize, mp: usize, mn: usize, mdp: usize, mdn: usize, rid: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_grpc_send")
declare function h_grpc_send(id: u32, p: usize, n: usize, end: u32): u32;
// @ts-ignore: decorator
@external("env", "proxy_grpc_cancel")
declare function h_grpc_cancel(id: u32): u32;
// @ts-ignore: decorator
@external("env", "proxy_grpc_close")
declare function h_grpc_close(id: u32): u32;
// @ts-ignore: decorator
@external("env", "proxy_get_buffer_status")
declare function h_buffer_status(t: u32, rsize: usize, rflags: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_get_buffer_bytes")
declare function h_get_buffer(t: u32, start: u32, len: u32, rp: usize, rn: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_set_buffer_bytes")
declare function h_set_buffer(t: u32, start: u32, len: u32, p: usize, n: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_get_header_map_value")
declare function h_get_header(t: u32, kp: usize, kn: usize, rp: usize, rn: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_get_header_map_pairs")
declare function h_get_pairs(t: u32, rp: usize, rn: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_get_header_map_size")
declare function h_map_size(t: u32, rsize: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_add_header_map_value")
declare function h_add_header(t: u32, kp: usize, kn: usize, vp: usize, vn: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_replace_header_map_value")
declare function h_replace_header(t: u32, kp: usize, kn: usize, vp: usize, vn: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_remove_header_map_value")
declare function h_remove_header(t: u32, kp: usize, kn: usize): u32;
// proxy_get_log_level exists only in ABI 0.2.1 (the gcore SDK); the build uncomments `//abi021:` lines there.
//abi021: // @ts-ignore: decorator
//abi021: @external("env", "proxy_get_log_level")
//abi021: declare function h_log_level(rp: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_get_current_time_nanoseconds")
declare function h_now(rp: usize): u32;
// @ts-ignore: decorator
@external("env", "proxy_continue_stream")
declare function h_continue(t: u32): u32;
// @ts-ignore: decorator
@external("env", "proxy_close_stream")
declare function h_close(t: u32): u32;
// @ts-ignore: decorator
@external("env", "proxy_set_effective_context")
declare function h_effective(id: u32): u32;
// @ts-ignore: decorator
@external("env", "proxy_get_status")
declare function h_get_status(rc: usize, rp: usize, rn: usize): u32;

// Out-parameters of host calls land here (kept alive as a global).
const slots = new ArrayBuffer(32);
const S = changetype<usize>(slots);

function enc(text: string): ArrayBuffer {
  return String.UTF8.encode(text);
}

function ptr(data: ArrayBuffer): usize {
  return changetype<usize>(data);
}

function taken(): ArrayBuffer {
  const p = load<u32>(S);
  const n = load<u32>(S + 4);
  const out = new ArrayBuffer(n);
  if (n > 0) {
    memory.copy(changetype<usize>(out), p, n);
  }
  return out;
}

const HEX = "0123456789abcdef";

function printable(data: ArrayBuffer): bool {
  const b = Uint8Array.wrap(data);
  for (let i = 0; i < b.length; i++) {
    if (b[i] < 32 || b[i] > 126) {
      return false;
    }
  }
  return true;
}

const VARYING = ["date", "server", "x-envoy-upstream-service-time", "x-request-id"];

function keyIs(at: usize, length: u32, name: string): bool {
  if (<u32>name.length != length) {
    return false;
  }
  for (let i: u32 = 0; i < length; i++) {
    if (<u32>load<u8>(at + i) != <u32>name.charCodeAt(i)) {
      return false;
    }
  }
  return true;
}

function fnv(hash: u64, at: usize, length: u32): u64 {
  let h = hash;
  for (let i: u32 = 0; i < length; i++) {
    h = (h ^ <u64>load<u8>(at + i)) * 1099511628211;
  }
  return h;
}

// A value in the header-map wire format as "m<count>:<digest>", the digest the same whatever the order of
// the pairs (Envoy's property maps have none); "" if `data` is not such a map. Values of headers that
// vary from run to run are left out. (Integers only: one SDK's old AssemblyScript runtime traps on
// strings built in loops here.)
function showMap(data: ArrayBuffer): string {
  const n = <u32>data.byteLength;
  if (n < 4) {
    return "";
  }
  const base = changetype<usize>(data);
  const count = load<u32>(base);
  if (count > 1024 || <u32>4 + <u32>8 * count > n) {
    return "";
  }
  let pos: u32 = <u32>4 + <u32>8 * count;
  let digest: u64 = 0;
  for (let i: u32 = 0; i < count; i++) {
    const kn = load<u32>(base + 4 + 8 * i);
    const vn = load<u32>(base + 8 + 8 * i);
    if (pos + kn + vn + 2 > n) {
      return "";
    }
    let h = fnv(14695981039346656037, base + pos, kn + 1);
    let varies = false;
    for (let v = 0; v < VARYING.length; v++) {
      varies = varies || keyIs(base + pos, kn, VARYING[v]);
    }
    if (!varies) {
      h = fnv(h, base + pos + kn + 1, vn);
    }
    digest += h;
    pos += kn + vn + 2;
  }
  if (pos != n) {
    return "";
  }
  return "m" + count.toString() + ":" + digest.toString(16);
}

// A value as text for a header: printable text as is, a map as its sorted pairs, anything else as hex
// (long values as length + head).
function show(data: ArrayBuffer): string {
  const map = showMap(data);
  if (map.length > 0) {
    return map;
  }
  if (data.byteLength <= 160 && printable(data)) {
    return "s:" + String.UTF8.decode(data);
  }
  const b = Uint8Array.wrap(data);
  const n = b.length < 64 ? b.length : 64;
  let out = "h" + b.length.toString() + ":";
  for (let i = 0; i < n; i++) {
    out += HEX.charAt(b[i] >> 4) + HEX.charAt(b[i] & 15);
  }
  return out;
}

function split(text: string, sep: string): string[] {
  const out: string[] = [];
  if (text.length == 0) {
    return out;
  }
  let start = 0;
  while (true) {
    const at = text.indexOf(sep, start);
    if (at < 0) {
      out.push(text.substring(start));
      return out;
    }
    out.push(text.substring(start, at));
    start = at + sep.length;
  }
}

function has(list: string[], name: string): bool {
  for (let i = 0; i < list.length; i++) {
    if (list[i] == name) {
      return true;
    }
  }
  return false;
}

function nulPath(dotted: string): ArrayBuffer {
  const parts = split(dotted, ".");
  const bytes = enc(parts.join("\0"));
  return bytes;
}

function readProperty(dotted: string): string {
  const path = nulPath(dotted);
  const status = h_get_property(ptr(path), path.byteLength, S, S + 4);
  if (status != 0) {
    return status.toString();
  }
  return "0:" + show(taken());
}

function header(map: u32, name: string): string {
  const key = enc(name);
  const status = h_get_header(map, ptr(key), key.byteLength, S, S + 4);
  if (status != 0) {
    return "";
  }
  return String.UTF8.decode(taken());
}

// Header pairs as "k=v;..." in order; values of headers that vary from run to run are left out.
function pairsText(map: u32): string {
  const status = h_get_pairs(map, S, S + 4);
  if (status != 0) {
    return "status" + status.toString();
  }
  const data = taken();
  if (data.byteLength == 0) {
    return "empty";
  }
  const base = changetype<usize>(data);
  const count = load<u32>(base);
  let pos = base + 4 + 8 * count;
  let out = "";
  for (let i: u32 = 0; i < count; i++) {
    const kn = load<u32>(base + 4 + 8 * i);
    const vn = load<u32>(base + 8 + 8 * i);
    let varies = false;
    for (let v = 0; v < VARYING.length; v++) {
      varies = varies || keyIs(pos, kn, VARYING[v]);
    }
    if (i > 0) {
      out += ";";
    }
    out += String.UTF8.decodeUnsafe(pos, kn);
    // Plain statements: the old AssemblyScript runtime of one SDK miscounts strings in conditional operands.
    if (!varies) {
      out += "=";
      out += String.UTF8.decodeUnsafe(pos + kn + 1, vn);
    }
    pos += kn + vn + 2;
  }
  return out;
}

function addResponse(name: string, value: string): void {
  const k = enc(name);
  const v = enc(value);
  h_add_header(2, ptr(k), k.byteLength, ptr(v), v.byteLength);
}

function addRequest(name: string, value: string): void {
  const k = enc(name);
  const v = enc(value);
  h_add_header(0, ptr(k), k.byteLength, ptr(v), v.byteLength);
}

function u32At(offset: usize): u32 {
  return load<u32>(S + offset);
}

function pair(key: string, value: string): HeaderPair {
  return new HeaderPair(enc(key), enc(value));
}

// -- probes run in on_request_headers; each returns its report ------------------------------------------

function probeMetrics(tag: string): string {
  const name = enc("probe_" + tag + "_counter");
  let out = "def=" + h_define_metric(0, ptr(name), name.byteLength, S).toString();
  const id = u32At(0);
  out += ",again=" + h_define_metric(0, ptr(name), name.byteLength, S).toString();
  out += ",sameid=" + (u32At(0) == id ? "yes" : "no");
  out += ",inc0=" + h_increment_metric(id, 0).toString();
  out += ",inc2=" + h_increment_metric(id, 2).toString();
  out += ",incneg=" + h_increment_metric(id, -1).toString();
  out += ",rec5=" + h_record_metric(id, 5).toString();
  out += ",get=" + h_get_metric(id, S).toString() + ":" + load<u64>(S).toString();
  out += ",unknown-inc=" + h_increment_metric(987654, 1).toString();
  out += ",unknown-rec=" + h_record_metric(987654, 1).toString();
  out += ",unknown-get=" + h_get_metric(987654, S).toString();
  // Envoy reads a metric's type from the id's two low bits: ids of each type that were never defined.
  for (let t: u32 = 0; t < 4; t++) {
    const unknown = 987648 + t;
    out += ",unknown" + t.toString() + "=" + h_increment_metric(unknown, 1).toString() + "/" +
      h_record_metric(unknown, 1).toString() + "/" + h_get_metric(unknown, S).toString();
  }
  const gname = enc("probe_" + tag + "_gauge");
  out += ",gdef=" + h_define_metric(1, ptr(gname), gname.byteLength, S).toString();
  const gid = u32At(0);
  out += ",grec=" + h_record_metric(gid, 7).toString();
  out += ",ginc=" + h_increment_metric(gid, -3).toString();
  out += ",gget=" + h_get_metric(gid, S).toString() + ":" + load<u64>(S).toString();
  const hname = enc("probe_" + tag + "_histogram");
  out += ",hdef=" + h_define_metric(2, ptr(hname), hname.byteLength, S).toString();
  const hid = u32At(0);
  out += ",hrec=" + h_record_metric(hid, 42).toString();
  out += ",hinc=" + h_increment_metric(hid, 1).toString();
  out += ",hget=" + h_get_metric(hid, S).toString();
  out += ",badtype=" + h_define_metric(7, ptr(name), name.byteLength, S).toString();
  return out;
}

function probeShared(tag: string): string {
  const k1 = enc("probe-" + tag + "-a");
  const k2 = enc("probe-" + tag + "-b");
  const v = enc("value");
  let out = "get-missing=" + h_get_shared(ptr(k1), k1.byteLength, S, S + 4, S + 8).toString();
  out += ",set1=" + h_set_shared(ptr(k1), k1.byteLength, ptr(v), v.byteLength, 0).toString();
  out += ",get1=" + h_get_shared(ptr(k1), k1.byteLength, S, S + 4, S + 8).toString();
  const cas1 = u32At(8);
  out += ",value=" + String.UTF8.decode(taken());
  out += ",set2=" + h_set_shared(ptr(k2), k2.byteLength, ptr(v), v.byteLength, 0).toString();
  h_get_shared(ptr(k2), k2.byteLength, S, S + 4, S + 8);
  const cas2 = u32At(8);
  out += ",cas2-cas1=" + (cas2 - cas1).toString();
  out += ",set-stale=" + h_set_shared(ptr(k1), k1.byteLength, ptr(v), v.byteLength, cas1 + 1000).toString();
  out += ",set-right=" + h_set_shared(ptr(k1), k1.byteLength, ptr(v), v.byteLength, cas1).toString();
  h_get_shared(ptr(k1), k1.byteLength, S, S + 4, S + 8);
  out += ",cas3-cas1=" + (u32At(8) - cas1).toString();
  out += ",set-old=" + h_set_shared(ptr(k1), k1.byteLength, ptr(v), v.byteLength, cas1).toString();
  const empty = new ArrayBuffer(0);
  out += ",set-empty=" + h_set_shared(ptr(k1), k1.byteLength, ptr(empty), 0, 0).toString();
  out += ",get-empty=" + h_get_shared(ptr(k1), k1.byteLength, S, S + 4, S + 8).toString() + ":" + u32At(4).toString();
  return out;
}

function probeQueue(tag: string): string {
  const name = enc("probe-" + tag + "-q");
  let out = "reg=" + h_register_queue(ptr(name), name.byteLength, S).toString();
  const id = u32At(0);
  out += ",again=" + h_register_queue(ptr(name), name.byteLength, S).toString();
  out += ",same=" + (u32At(0) == id ? "yes" : "no");
  const vm = enc("probe-vm");
  out += ",resolve=" + h_resolve_queue(ptr(vm), vm.byteLength, ptr(name), name.byteLength, S).toString();
  out += ",resolved-same=" + (u32At(0) == id ? "yes" : "no");
  const other = enc("other-vm");
  out += ",resolve-other=" + h_resolve_queue(ptr(other), other.byteLength, ptr(name), name.byteLength, S).toString();
  const none = enc("");
  out += ",resolve-empty-vm=" + h_resolve_queue(ptr(none), 0, ptr(name), name.byteLength, S).toString();
  const missing = enc("no-such-queue");
  out += ",resolve-missing=" + h_resolve_queue(ptr(vm), vm.byteLength, ptr(missing), missing.byteLength, S).toString();
  out += ",deq-empty=" + h_dequeue(id, S, S + 4).toString();
  const item = enc("item-1");
  out += ",enq=" + h_enqueue(id, ptr(item), item.byteLength).toString();
  out += ",deq=" + h_dequeue(id, S, S + 4).toString() + ":" + String.UTF8.decode(taken());
  out += ",enq-unknown=" + h_enqueue(987654, ptr(item), item.byteLength).toString();
  out += ",deq-unknown=" + h_dequeue(987654, S, S + 4).toString();
  return out;
}

function probeForeign(names: string): string {
  const list = split(names, ";");
  let out = "";
  const arg = enc("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa");
  for (let i = 0; i < list.length; i++) {
    const name = enc(list[i]);
    const status = h_foreign(ptr(name), name.byteLength, ptr(arg), arg.byteLength, S, S + 4);
    out += (i > 0 ? "," : "") + list[i] + "=" + status.toString();
    if (status == 0) {
      const result = taken();
      out += ":" + result.byteLength.toString();
      if (list[i] == "compress") {
        const back = enc("uncompress");
        const again = h_foreign(ptr(back), back.byteLength, ptr(result), result.byteLength, S, S + 4);
        out += ":" + again.toString() + ":";
        if (again == 0) {
          out += String.UTF8.decode(taken()).length.toString();
        }
      }
    }
  }
  return out;
}

function probeGrpc(cluster: string): string {
  const up = enc(cluster);
  const svc = enc("grpc.health.v1.Health");
  const method = enc("Check");
  const msg = new ArrayBuffer(0);
  let out = "call=" + h_grpc_call(ptr(up), up.byteLength, ptr(svc), svc.byteLength, ptr(method), method.byteLength,
    0, 0, ptr(msg), 0, 1000, S).toString();
  out += ",stream=" + h_grpc_stream(ptr(up), up.byteLength, ptr(svc), svc.byteLength, ptr(method),
    method.byteLength, 0, 0, S).toString();
  out += ",send=" + h_grpc_send(987654, ptr(msg), 0, 0).toString();
  out += ",cancel=" + h_grpc_cancel(987654).toString();
  out += ",close=" + h_grpc_close(987654).toString();
  return out;
}

function probeMisc(): string {
  let out = "";
  //abi021: out += "loglevel=" + h_log_level(S).toString() + ",";
  out += "now=" + h_now(S).toString();
  const now = load<u64>(S);
  out += ",now-plausible=" + (now > 1600000000000000000 ? "yes" : "no");
  out += ",reqsize=" + h_map_size(0, S).toString();
  out += ",ressize=" + h_map_size(2, S).toString();
  out += ",calltrailers=" + h_map_size(7, S).toString();
  out += ",badmap=" + h_map_size(9, S).toString();
  out += ",badmap-pairs=" + h_get_pairs(9, S, S + 4).toString();
  out += ",reqbody-status=" + h_buffer_status(0, S, S + 4).toString();
  out += ",callbody-status=" + h_buffer_status(4, S, S + 4).toString();
  out += ",vmconf-status=" + h_buffer_status(6, S, S + 4).toString() + ":" + u32At(0).toString();
  out += ",pluginconf-status=" + h_buffer_status(7, S, S + 4).toString() + ":" + u32At(0).toString();
  out += ",badbuf=" + h_buffer_status(42, S, S + 4).toString();
  out += ",effective-bogus=" + h_effective(987654).toString();
  const missing = enc("x-not-there");
  out += ",get-missing=" + h_get_header(0, ptr(missing), missing.byteLength, S, S + 4).toString();
  out += ",remove-missing=" + h_remove_header(0, ptr(missing), missing.byteLength).toString();
  out += ",close-bad=" + h_close(9).toString();
  out += ",continue-bad=" + h_continue(9).toString();
  store<u32>(S, 77);
  store<u32>(S + 8, 0);
  out += ",status=" + h_get_status(S, S + 4, S + 8).toString() + ":" + u32At(0).toString() + ":" + u32At(8).toString();
  return out;
}

function probeSetProperty(): string {
  const path = nulPath("probe.custom");
  const value = enc("set-by-module");
  let out = "set=" + h_set_property(ptr(path), path.byteLength, ptr(value), value.byteLength).toString();
  out += ",get=" + readProperty("probe.custom");
  const builtin = nulPath("request.path");
  out += ",set-builtin=" + h_set_property(ptr(builtin), builtin.byteLength, ptr(value), value.byteLength).toString();
  out += ",builtin-after=" + readProperty("request.path");
  const single = enc("probe_single");
  out += ",set-single=" + h_set_property(ptr(single), single.byteLength, ptr(value), value.byteLength).toString();
  out += ",get-single=" + readProperty("probe_single");
  return out;
}

// Every header-map call on one map, as status codes (used on maps Envoy no longer holds).
function probeMap(map: u32): string {
  const k = enc("x-probe-map");
  const v = enc("1");
  let out = "size=" + h_map_size(map, S).toString();
  out += ",get=" + h_get_header(map, ptr(k), k.byteLength, S, S + 4).toString();
  out += ",pairs=" + h_get_pairs(map, S, S + 4).toString() + ":" + u32At(4).toString();
  out += ",add=" + h_add_header(map, ptr(k), k.byteLength, ptr(v), v.byteLength).toString();
  out += ",replace=" + h_replace_header(map, ptr(k), k.byteLength, ptr(v), v.byteLength).toString();
  out += ",remove=" + h_remove_header(map, ptr(k), k.byteLength).toString();
  return out;
}

class ProbeRoot extends RootContext {
  createContext(context_id: u32): Context {
    return new Probe(context_id, this);
  }
  onConfigure(size: u32): bool {
    const ok = super.onConfigure(size);
    const name = enc("probe_configured");
    h_define_metric(0, ptr(name), name.byteLength, S);
    h_increment_metric(u32At(0), 1);
    return ok;
  }
}

class Probe extends Context {
  props: string[] = [];
  reqBody: string = "";
  respBody: string = "";
  reqTrace: string = "";
  respTrace: string = "";
  report: string[] = [];
  callout: string = "";

  constructor(context_id: u32, root_context: ProbeRoot) {
    super(context_id, root_context);
  }

  note(name: string, value: string): void {
    this.report.push(name);
    this.report.push(value);
  }

  onRequestHeaders(count: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const probes = split(header(0, "x-probe"), ",");
    const tag = header(0, "x-tag");
    this.props = split(header(0, "x-props"), ",");
    this.reqBody = header(0, "x-req-body");
    this.respBody = header(0, "x-resp-body");
    this.note("x-r-headers-eos", end_of_stream ? "1" : "0");
    for (let i = 0; i < this.props.length; i++) {
      this.note("x-p-" + this.props[i], readProperty(this.props[i]));
    }
    if (has(probes, "metrics")) this.note("x-r-metrics", probeMetrics(tag));
    if (has(probes, "shared")) this.note("x-r-shared", probeShared(tag));
    if (has(probes, "queue")) this.note("x-r-queue", probeQueue(tag));
    if (has(probes, "misc")) this.note("x-r-misc", probeMisc());
    if (has(probes, "setprop")) this.note("x-r-setprop", probeSetProperty());
    const ffi = header(0, "x-ffi");
    if (ffi != "") this.note("x-r-ffi", probeForeign(ffi));
    const grpc = header(0, "x-grpc");
    if (grpc != "") this.note("x-r-grpc", probeGrpc(grpc));
    if (has(probes, "pairs")) this.note("x-r-request-pairs", pairsText(0));
    if (has(probes, "lastlog")) {
      const key = enc("probe-last-log");
      const got = h_get_shared(ptr(key), key.byteLength, S, S + 4, S + 8);
      this.note("x-r-last-log", got.toString() + ":" + String.UTF8.decode(taken()));
    }
    if (has(probes, "maps")) {
      this.note("x-r-maps-response-in-request", probeMap(2));
      this.note("x-r-maps-trailers-in-request", probeMap(1));
    }
    if (has(probes, "reqmaps")) {
      addRequest("x-added", "1");
      const k = enc(":path");
      const v = enc("/rewritten");
      this.note("x-r-path-replace", h_replace_header(0, ptr(k), k.byteLength, ptr(v), v.byteLength).toString());
    }
    const callout = header(0, "x-callout");
    if (callout != "") {
      const parts = split(callout, "|");
      const call: Headers = [];
      call.push(pair(":method", "GET"));
      call.push(pair(":path", parts[1]));
      call.push(pair(":authority", "callout.local"));
      const timeout: u32 = parts.length > 2 ? <u32>parseInt(parts[2]) : 5000;
      const status = this.root_context.httpCall(parts[0], call, new ArrayBuffer(0), [], timeout, this, onCallout);
      this.note("x-r-callout-status", (status as u32).toString());
      if (status == 0) {
        return FilterHeadersStatusValues.StopIteration;
      }
    }
    const mode = header(0, "x-req-headers");
    if (mode == "stop") return FilterHeadersStatusValues.StopIteration;
    if (mode == "stop-all") return FilterHeadersStatusValues.StopAllIterationAndBuffer;
    if (mode == "stop-watermark") return FilterHeadersStatusValues.StopAllIterationAndWatermark;
    if (mode == "continue-end") return FilterHeadersStatusValues.ContinueAndEndStream;
    if (mode == "local") {
      send_local_response(403, "probe_denied", enc("denied"), [], -1 as GrpcStatusValues);
      return FilterHeadersStatusValues.StopIteration;
    }
    if (mode == "local-typed") {
      const typed: Headers = [];
      typed.push(pair("content-type", "application/json"));
      typed.push(pair("x-dup", "a"));
      typed.push(pair("x-dup", "b"));
      send_local_response(401, "probe typed", enc("{}"), typed, 7 as GrpcStatusValues);
      return FilterHeadersStatusValues.StopIteration;
    }
    if (mode == "local-empty") {
      send_local_response(204, "", new ArrayBuffer(0), [], -1 as GrpcStatusValues);
      return FilterHeadersStatusValues.StopIteration;
    }
    return FilterHeadersStatusValues.Continue;
  }

  // What on_log sees (Envoy's access-log view), kept in shared data for the next request to report.
  onLog(): void {
    let seen = readProperty("request.path") + "|" + readProperty("response.code") + "|" +
      readProperty("response.code_details") + "|" + readProperty("upstream.request_attempt_count") + "|" +
      readProperty("request.duration").substring(0, 1) + "|" + header(0, ":path") + "|" +
      h_map_size(2, S).toString() + "|" + header(2, ":status");
    const key = enc("probe-last-log");
    const value = enc(seen);
    h_set_shared(ptr(key), key.byteLength, ptr(value), value.byteLength, 0);
  }

  onRequestBody(size: usize, end_of_stream: bool): FilterDataStatusValues {
    const status = h_buffer_status(0, S, S + 4);
    this.reqTrace += (this.reqTrace.length > 0 ? "," : "") + size.toString() + "/" + (end_of_stream ? "1" : "0") +
      "/" + status.toString() + ":" + u32At(0).toString() + ":" + u32At(4).toString() +
      "/" + h_map_size(0, S + 8).toString() + ":" + header(0, ":path");
    return this.body(0, this.reqBody, size, end_of_stream);
  }

  onResponseHeaders(count: u32, end_of_stream: bool): FilterHeadersStatusValues {
    for (let i = 0; i + 1 < this.report.length; i += 2) {
      addResponse(this.report[i], this.report[i + 1]);
    }
    for (let i = 0; i < this.props.length; i++) {
      addResponse("x-q-" + this.props[i], readProperty(this.props[i]));
    }
    addResponse("x-r-request-body", this.reqTrace);
    addResponse("x-r-response-eos", end_of_stream ? "1" : "0");
    if (this.callout != "") {
      addResponse("x-r-callout", this.callout);
    }
    if (this.reqBody == "maps") {
      addResponse("x-r-maps-request-in-response", probeMap(0));
    }
    if (header(0, "x-probe") != "" || this.reqBody != "") {
      // What is left of the request headers in the response phase.
      addResponse("x-r-request-in-response", header(0, ":path") + "|" + h_map_size(0, S).toString());
    }
    if (this.respBody == "trace" || this.respBody == "end-replace") {
      const k = enc("content-length");
      h_remove_header(2, ptr(k), k.byteLength);
    }
    if (this.respBody == "callout-local" || this.respBody == "callout-continue") {
      const call: Headers = [];
      call.push(pair(":method", "GET"));
      call.push(pair(":path", "/callout"));
      call.push(pair(":authority", "callout.local"));
      this.root_context.httpCall("echo", call, new ArrayBuffer(0), [], 3000, this, onResponseCallout);
      return FilterHeadersStatusValues.StopIteration;
    }
    if (this.respBody == "local-headers") {
      send_local_response(418, "probe_teapot", enc("teapot"), [], -1 as GrpcStatusValues);
      return FilterHeadersStatusValues.StopIteration;
    }
    return FilterHeadersStatusValues.Continue;
  }

  onResponseBody(size: usize, end_of_stream: bool): FilterDataStatusValues {
    const status = h_buffer_status(1, S, S + 4);
    this.respTrace += (this.respTrace.length > 0 ? "," : "") + size.toString() + "/" + (end_of_stream ? "1" : "0") +
      "/" + status.toString() + ":" + u32At(0).toString() + ":" + u32At(4).toString() +
      "/" + h_map_size(2, S + 8).toString() + ":" + header(2, ":status");
    if (this.respBody == "trace") {
      if (end_of_stream) {
        const tail = enc("|" + this.respTrace);
        h_set_buffer(1, size as u32, 0, ptr(tail), tail.byteLength);
      }
      return FilterDataStatusValues.Continue;
    }
    return this.body(1, this.respBody, size, end_of_stream);
  }

  body(buffer: u32, mode: string, size: usize, end_of_stream: bool): FilterDataStatusValues {
    if (mode == "buffer") {
      return end_of_stream ? FilterDataStatusValues.Continue : FilterDataStatusValues.StopIterationAndBuffer;
    }
    if (mode == "end-replace" && end_of_stream) {
      const out = enc("<" + size.toString() + ">");
      h_set_buffer(buffer, 0, size as u32, ptr(out), out.byteLength);
    }
    if (mode == "grow") {
      const out = enc("+GROWN");
      h_set_buffer(buffer, size as u32, 0, ptr(out), out.byteLength);
    }
    if (mode == "shrink" && size > 0) {
      const out = enc("x");
      h_set_buffer(buffer, 0, size as u32, ptr(out), out.byteLength);
    }
    if (mode == "local") {
      send_local_response(418, "probe_teapot", enc("teapot"), [], -1 as GrpcStatusValues);
      return FilterDataStatusValues.StopIterationNoBuffer;
    }
    if (mode == "close") {
      h_close(buffer);
      return FilterDataStatusValues.StopIterationNoBuffer;
    }
    return FilterDataStatusValues.Continue;
  }
}

function onCallout(origin: CALLBACK_CONTEXT, headers: u32, body_size: usize, trailers: u32): void {
  const self = changetype<Probe>(origin);
  h_get_buffer(4, 0, body_size as u32, S, S + 4);
  const body = String.UTF8.decode(taken());
  store<u32>(S + 16, 77);  // a sentinel: shows whether proxy_get_status wrote a code
  store<u32>(S + 4, 0);
  const got = h_get_status(S + 16, S, S + 4);
  const code = load<u32>(S + 16);
  const message = String.UTF8.decode(taken());
  self.callout = headers.toString() + "|" + body_size.toString() + "|" + trailers.toString() + "|" + got.toString() +
    ":" + code.toString() + ":" + message + "|" + pairsText(6) + "|" + body;
  h_continue(0);
}

function onResponseCallout(origin: CALLBACK_CONTEXT, headers: u32, body_size: usize, trailers: u32): void {
  const self = changetype<Probe>(origin);
  addResponse("x-r-response-callout", headers.toString() + "|" + body_size.toString());
  if (self.respBody == "callout-local") {
    send_local_response(409, "probe_conflict", enc("conflict"), [], -1 as GrpcStatusValues);
    return;
  }
  h_continue(1);
}

registerRootContext((context_id: u32) => {
  return new ProbeRoot(context_id);
}, "probe");
