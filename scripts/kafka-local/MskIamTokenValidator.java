// A test stand-in for Amazon MSK's IAM access control, for the local broker
// that scripts/kafka-local.sh starts: the SASL/OAUTHBEARER server callback
// handler of its MSK_IAM listener. It checks a token as MSK does: a
// SigV4-presigned "GET https://kafka.<region>.amazonaws.com/?Action=
// kafka-cluster:Connect" URL, base64url-encoded, signed for the service
// kafka-cluster by the test access key with the test secret, not expired.
// It honours a token for at most tokenMaxAgeSeconds after its signing time
// (0: until it expires), so clients must re-authenticate with fresh tokens.
// The test credentials come from the listener's JAAS options.
package local.microbatch;

import java.net.URI;
import java.net.URLDecoder;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.time.LocalDateTime;
import java.time.ZoneOffset;
import java.time.format.DateTimeFormatter;
import java.util.Base64;
import java.util.Collections;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeMap;
import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;
import javax.security.auth.callback.Callback;
import javax.security.auth.callback.UnsupportedCallbackException;
import javax.security.auth.login.AppConfigurationEntry;
import org.apache.kafka.common.security.auth.AuthenticateCallbackHandler;
import org.apache.kafka.common.security.oauthbearer.OAuthBearerExtensionsValidatorCallback;
import org.apache.kafka.common.security.oauthbearer.OAuthBearerToken;
import org.apache.kafka.common.security.oauthbearer.OAuthBearerValidatorCallback;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

public final class MskIamTokenValidator implements AuthenticateCallbackHandler {
    private static final Logger LOG = LoggerFactory.getLogger(MskIamTokenValidator.class);
    private static final String SERVICE = "kafka-cluster";
    private static final String ACTION = "kafka-cluster:Connect";
    private static final long MAX_CLOCK_SKEW_MS = 5 * 60 * 1000;
    private static final DateTimeFormatter AMZ_DATE = DateTimeFormatter.ofPattern("yyyyMMdd'T'HHmmss'Z'");

    private String accessKeyId;
    private String secretAccessKey;
    private String region;
    private long maxAgeMs;

    /** Why a token was refused; the message never contains the token. */
    private static final class Refused extends Exception {
        Refused(String reason) {
            super(reason);
        }
    }

    @Override
    public void configure(Map<String, ?> configs, String mechanism, List<AppConfigurationEntry> entries) {
        Map<String, ?> options = entries.get(0).getOptions();
        accessKeyId = option(options, "accessKeyId");
        secretAccessKey = option(options, "secretAccessKey");
        region = option(options, "region");
        maxAgeMs = Long.parseLong(option(options, "tokenMaxAgeSeconds")) * 1000;
    }

    private static String option(Map<String, ?> options, String name) {
        Object value = options.get(name);
        if (!(value instanceof String) || ((String) value).isEmpty()) {
            throw new IllegalArgumentException("MskIamTokenValidator needs the JAAS option " + name);
        }
        return (String) value;
    }

    @Override
    public void handle(Callback[] callbacks) throws UnsupportedCallbackException {
        for (Callback callback : callbacks) {
            if (callback instanceof OAuthBearerValidatorCallback) {
                OAuthBearerValidatorCallback v = (OAuthBearerValidatorCallback) callback;
                try {
                    v.token(validate(v.tokenValue(), System.currentTimeMillis()));
                } catch (Refused e) {
                    LOG.info("MSK IAM token refused: {}", e.getMessage());
                    v.error("invalid_token", null, null);
                }
            } else if (callback instanceof OAuthBearerExtensionsValidatorCallback) {
                OAuthBearerExtensionsValidatorCallback e = (OAuthBearerExtensionsValidatorCallback) callback;
                e.inputExtensions().map().keySet().forEach(e::valid);
            } else {
                throw new UnsupportedCallbackException(callback);
            }
        }
    }

    private OAuthBearerToken validate(String token, long nowMs) throws Refused {
        String url;
        URI uri;
        try {
            url = new String(Base64.getUrlDecoder().decode(token), StandardCharsets.UTF_8);
            uri = new URI(url);
        } catch (IllegalArgumentException | java.net.URISyntaxException e) {
            throw new Refused("not a base64url-encoded URL");
        }
        String host = "kafka." + region + ".amazonaws.com";
        if (!"https".equals(uri.getScheme()) || !host.equals(uri.getHost()) || !"/".equals(uri.getRawPath())) {
            throw new Refused("not a presigned URL for " + host);
        }
        Map<String, String> params = new TreeMap<>();
        String rawQuery = uri.getRawQuery() == null ? "" : uri.getRawQuery();
        for (String pair : rawQuery.split("&")) {
            int eq = pair.indexOf('=');
            if (eq <= 0) {
                throw new Refused("malformed query");
            }
            String key = URLDecoder.decode(pair.substring(0, eq), StandardCharsets.UTF_8);
            String value = URLDecoder.decode(pair.substring(eq + 1), StandardCharsets.UTF_8);
            if (params.put(key, value) != null) {
                throw new Refused("parameter " + key + " given twice");
            }
        }
        if (!ACTION.equals(params.get("Action"))) {
            throw new Refused("action is not " + ACTION);
        }
        if (!"AWS4-HMAC-SHA256".equals(params.get("X-Amz-Algorithm"))) {
            throw new Refused("algorithm is not AWS4-HMAC-SHA256");
        }
        if (!"host".equals(params.get("X-Amz-SignedHeaders"))) {
            throw new Refused("signed headers are not just host");
        }
        String[] scope = String.valueOf(params.get("X-Amz-Credential")).split("/");
        if (scope.length != 5 || !scope[3].equals(SERVICE) || !scope[4].equals("aws4_request")) {
            throw new Refused("credential scope is not .../" + SERVICE + "/aws4_request");
        }
        if (!scope[2].equals(region)) {
            throw new Refused("signed for region " + scope[2] + ", not " + region);
        }
        if (!scope[0].equals(accessKeyId)) {
            throw new Refused("unknown access key");
        }
        String amzDate = String.valueOf(params.get("X-Amz-Date"));
        long signedMs;
        long expiresS;
        try {
            signedMs = LocalDateTime.parse(amzDate, AMZ_DATE).toInstant(ZoneOffset.UTC).toEpochMilli();
            expiresS = Long.parseLong(String.valueOf(params.get("X-Amz-Expires")));
        } catch (RuntimeException e) {
            throw new Refused("malformed X-Amz-Date or X-Amz-Expires");
        }
        if (!amzDate.startsWith(scope[1])) {
            throw new Refused("credential date differs from X-Amz-Date");
        }
        if (expiresS < 1 || expiresS > 900) {
            throw new Refused("X-Amz-Expires must be 1..900");
        }
        if (signedMs > nowMs + MAX_CLOCK_SKEW_MS) {
            throw new Refused("signed in the future");
        }
        long expiresMs = signedMs + expiresS * 1000;
        if (maxAgeMs > 0) {
            expiresMs = Math.min(expiresMs, signedMs + maxAgeMs);
        }
        if (nowMs >= expiresMs) {
            throw new Refused("expired " + (nowMs - expiresMs) / 1000 + " s ago (signed at " + amzDate + ")");
        }

        StringBuilder canonicalQuery = new StringBuilder();
        for (Map.Entry<String, String> p : params.entrySet()) {
            if (p.getKey().equals("X-Amz-Signature") || p.getKey().equals("User-Agent")) {
                continue;
            }
            if (canonicalQuery.length() > 0) {
                canonicalQuery.append('&');
            }
            canonicalQuery.append(uriEncode(p.getKey())).append('=').append(uriEncode(p.getValue()));
        }
        String canonicalRequest = "GET\n/\n" + canonicalQuery + "\nhost:" + host + "\n\nhost\n" + sha256Hex("");
        String credentialScope = scope[1] + "/" + scope[2] + "/" + SERVICE + "/aws4_request";
        String stringToSign = "AWS4-HMAC-SHA256\n" + amzDate + "\n" + credentialScope + "\n" + sha256Hex(canonicalRequest);
        byte[] key = hmac(("AWS4" + secretAccessKey).getBytes(StandardCharsets.UTF_8), scope[1]);
        key = hmac(key, scope[2]);
        key = hmac(key, SERVICE);
        key = hmac(key, "aws4_request");
        String expected = hex(hmac(key, stringToSign));
        String given = String.valueOf(params.get("X-Amz-Signature"));
        if (!MessageDigest.isEqual(expected.getBytes(StandardCharsets.US_ASCII), given.getBytes(StandardCharsets.US_ASCII))) {
            throw new Refused("signature does not match (wrong secret key?)");
        }
        return new Token(token, expiresMs, signedMs);
    }

    private static String uriEncode(String s) {
        StringBuilder out = new StringBuilder();
        for (byte b : s.getBytes(StandardCharsets.UTF_8)) {
            char c = (char) (b & 0xff);
            if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')
                    || c == '-' || c == '_' || c == '.' || c == '~') {
                out.append(c);
            } else {
                out.append('%').append(String.format("%02X", b & 0xff));
            }
        }
        return out.toString();
    }

    private static byte[] hmac(byte[] key, String data) {
        try {
            Mac mac = Mac.getInstance("HmacSHA256");
            mac.init(new SecretKeySpec(key, "HmacSHA256"));
            return mac.doFinal(data.getBytes(StandardCharsets.UTF_8));
        } catch (java.security.GeneralSecurityException e) {
            throw new IllegalStateException(e);
        }
    }

    private static String sha256Hex(String data) {
        try {
            return hex(MessageDigest.getInstance("SHA-256").digest(data.getBytes(StandardCharsets.UTF_8)));
        } catch (java.security.NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }

    private static String hex(byte[] bytes) {
        StringBuilder out = new StringBuilder();
        for (byte b : bytes) {
            out.append(String.format("%02x", b & 0xff));
        }
        return out.toString();
    }

    private static final class Token implements OAuthBearerToken {
        private final String value;
        private final long lifetimeMs;
        private final long startMs;

        Token(String value, long lifetimeMs, long startMs) {
            this.value = value;
            this.lifetimeMs = lifetimeMs;
            this.startMs = startMs;
        }

        @Override
        public String value() {
            return value;
        }

        @Override
        public Set<String> scope() {
            return Collections.emptySet();
        }

        @Override
        public long lifetimeMs() {
            return lifetimeMs;
        }

        @Override
        public String principalName() {
            return "msk-iam-test-user";
        }

        @Override
        public Long startTimeMs() {
            return startMs;
        }
    }

    @Override
    public void close() {}
}
