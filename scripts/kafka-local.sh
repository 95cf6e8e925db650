#!/usr/bin/env bash
# kafka-local.sh - a real single-node Apache Kafka 4.x (KRaft) broker for tests
# and local development. Run `scripts/kafka-local.sh --help` for details.
#
# Needs: bash, java and javac (17+), mvn, openssl, and either unzip or jar.
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd)

KAFKA_VERSION=${KAFKA_VERSION:-4.3.2}
LOG4J_VERSION=${LOG4J_VERSION:-2.24.3}
DEPENDENCY_PLUGIN=${KAFKA_LOCAL_DEPENDENCY_PLUGIN:-org.apache.maven.plugins:maven-dependency-plugin:3.8.1}

STATE_DIR=${KAFKA_LOCAL_DIR:-$ROOT/.kafka-local}
CACHE_ROOT=${KAFKA_LOCAL_CACHE:-$STATE_DIR/cache}
CACHE_DIR=$CACHE_ROOT/kafka-$KAFKA_VERSION-log4j-$LOG4J_VERSION
LIB_DIR=$CACHE_DIR/lib
CLASS_INDEX=$CACHE_DIR/classes.txt
CACHE_MARKER=$CACHE_DIR/.complete
# Bump the rev when the artifact list in write_pom changes, to refetch.
CACHE_SPEC="rev=2 kafka_2.13,kafka-tools=$KAFKA_VERSION log4j-slf4j-impl,log4j-core=$LOG4J_VERSION"

PLAINTEXT_PORT=${KAFKA_PLAINTEXT_PORT:-9092}
CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-9093}
SCRAM_PORT=${KAFKA_SCRAM_PORT:-9096}
MSK_IAM_PORT=${KAFKA_MSK_IAM_PORT:-9098}
MSK_IAM_REGION=${KAFKA_MSK_IAM_REGION:-us-east-1}
# The MSK_IAM listener honours a token for at most this long after signing.
MSK_IAM_TOKEN_MAX_AGE=${KAFKA_MSK_IAM_TOKEN_MAX_AGE_S:-60}
HOST=127.0.0.1
SCRAM_USER=${KAFKA_SCRAM_USER:-microbatch}
AUTO_CREATE_TOPICS=${KAFKA_AUTO_CREATE_TOPICS:-false}
CONSUMER_SESSION_TIMEOUT_MS=${KAFKA_CONSUMER_SESSION_TIMEOUT_MS:-10000}
CONSUMER_HEARTBEAT_MS=${KAFKA_CONSUMER_HEARTBEAT_MS:-500}
SHARE_SESSION_TIMEOUT_MS=${KAFKA_SHARE_SESSION_TIMEOUT_MS:-10000}
SHARE_HEARTBEAT_MS=${KAFKA_SHARE_HEARTBEAT_MS:-1000}
# The broker's default acquisition lock stays (30 s); the minimum is lowered so
# a test can shorten it for its own group (share.record.lock.duration.ms).
SHARE_MIN_LOCK_MS=${KAFKA_SHARE_MIN_RECORD_LOCK_MS:-1000}
HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xmx512m -Xms256m}
TOOL_HEAP_OPTS=${KAFKA_TOOL_HEAP_OPTS:--Xmx512m}
START_TIMEOUT=${KAFKA_LOCAL_START_TIMEOUT:-90}
STOP_TIMEOUT=${KAFKA_LOCAL_STOP_TIMEOUT:-30}

CONFIG_DIR=$STATE_DIR/config
DATA_DIR=$STATE_DIR/data
LOG_DIR=$STATE_DIR/logs
TLS_DIR=$STATE_DIR/tls
PID_FILE=$STATE_DIR/kafka.pid
SECRETS_FILE=$STATE_DIR/secrets.env
SERVER_PROPS=$CONFIG_DIR/server.properties
SERVER_LOG4J=$CONFIG_DIR/log4j2.xml
TOOLS_LOG4J=$CONFIG_DIR/tools-log4j2.xml
SERVER_LOG=$LOG_DIR/server.log
STDOUT_LOG=$LOG_DIR/kafka.out
SCRAM_ENV=$STATE_DIR/scram.env
PLAINTEXT_ENV=$STATE_DIR/plaintext.env
CLIENT_SCRAM_PROPS=$STATE_DIR/client-scram.properties
CLIENT_PLAINTEXT_PROPS=$STATE_DIR/client-plaintext.properties
MSK_IAM_ENV=$STATE_DIR/msk-iam.env
MSK_IAM_SRC=$SCRIPT_DIR/kafka-local/MskIamTokenValidator.java
MSK_IAM_CLASSES=$STATE_DIR/msk-iam-classes
MSK_IAM_CLASS=local.microbatch.MskIamTokenValidator

JAVA=${JAVA_HOME:+$JAVA_HOME/bin/}java
JAVAC=${JAVA_HOME:+$JAVA_HOME/bin/}javac

log() { printf 'kafka-local: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
	cat <<EOF
Usage: scripts/kafka-local.sh <command> [args]

A real single-node Apache Kafka $KAFKA_VERSION broker (KRaft, broker+controller in
one JVM) for tests and local development. State lives in .kafka-local/ at the
repository root (git-ignored).

Commands:
  start            Download the jars (first time only), create a throw-away CA,
                   broker certificate and SCRAM user (first time only), start the
                   broker in the background and wait until it is ready.
                   Does nothing (exit 0) if it is already running.
  stop             Stop the broker this script started (SIGTERM, then SIGKILL
                   after ${STOP_TIMEOUT}s).
  status           Print whether the broker runs. Exit 0 if running, 3 if not.
  logs [-f] [-n N] Show the last N (default 100) lines of the server log;
                   -f follows it.
  reset            Stop the broker and delete its data, logs, certificates and
                   credentials (the jar cache is kept).
  tool NAME ARGS   Run a Kafka command-line tool from the cached jars. NAME is one of
                     topics, configs, consumer-groups, consumer-perf-test,
                     producer-perf-test, console-producer, console-consumer,
                     get-offsets, delete-records, acls, metadata-quorum,
                     broker-api-versions, storage, features, share-groups,
                     share-consumer-perf-test, console-share-consumer
                   or a fully qualified Java main class.
  java-source FILE ARGS
                   Run a single-file Java program (e.g. scripts/kafka-local/SharePeer.java,
                   Kafka's KafkaShareConsumer as a share-group peer) with the
                   broker's jars on the class path.
  help, --help     This text.

Listeners (all on 127.0.0.1 only):
  PLAINTEXT   127.0.0.1:$PLAINTEXT_PORT   no auth, also used inter-broker
  SASL_SSL    127.0.0.1:$SCRAM_PORT   SCRAM-SHA-512 over TLS (MSK's port), user '$SCRAM_USER'
  MSK_IAM     127.0.0.1:$MSK_IAM_PORT   SASL_SSL + OAUTHBEARER with MSK IAM tokens (MSK's IAM port):
              SigV4-signed by the test access key in msk-iam.env for region
              $MSK_IAM_REGION, checked by scripts/kafka-local/MskIamTokenValidator.java
              (compiled at start); a token is honoured for at most
              ${MSK_IAM_TOKEN_MAX_AGE}s after signing, so clients must re-authenticate
  CONTROLLER  127.0.0.1:$CONTROLLER_PORT   KRaft controller, not for clients

Broker settings worth knowing:
  auto.create.topics.enable=$AUTO_CREATE_TOPICS: tests must create their topics
  explicitly (e.g. with 'tool topics --create'). Set KAFKA_AUTO_CREATE_TOPICS=true
  before 'start' to change that. Replication factor 1 everywhere,
  num.partitions=1, group.initial.rebalance.delay.ms=0. The StandardAuthorizer
  with allow.everyone.if.no.acl.found=true and ANONYMOUS (PLAINTEXT) as super
  user: open to all until a test adds an ACL ('tool acls --add ...').
  Every group protocol: classic, consumer (KIP-848) with a session of
  ${CONSUMER_SESSION_TIMEOUT_MS} ms and heartbeats every ${CONSUMER_HEARTBEAT_MS} ms, and share groups (KIP-932)
  with a session of ${SHARE_SESSION_TIMEOUT_MS} ms, heartbeats every ${SHARE_HEARTBEAT_MS} ms and the broker's
  30 s acquisition lock (a group may lower it to ${SHARE_MIN_LOCK_MS} ms). Data formatted by
  an older Kafka without share.version is upgraded to this release's features.

Files written by 'start' (in .kafka-local/):
  scram.env                 KAFKA_BOOTSTRAP_SERVERS, KAFKA_SECURITY_PROTOCOL,
                            KAFKA_SASL_MECHANISM, KAFKA_USERNAME, KAFKA_PASSWORD,
                            KAFKA_SSL_CA_LOCATION for the SASL_SSL listener
  plaintext.env             KAFKA_BOOTSTRAP_SERVERS for the PLAINTEXT listener
  client-scram.properties   Java client config for the SASL_SSL listener
  client-plaintext.properties
  msk-iam.env               KAFKA_BOOTSTRAP_SERVERS, KAFKA_SECURITY_PROTOCOL,
                            KAFKA_SASL_MECHANISM=AWS_MSK_IAM, AWS_REGION,
                            AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (test values
                            the MSK_IAM listener accepts), KAFKA_SSL_CA_LOCATION,
                            MSK_IAM_TOKEN_LIFETIME_S (short enough for the listener)
  tls/ca.pem                CA certificate that signed the broker certificate
  logs/server.log           broker log (logs/kafka.out: JVM stdout/stderr)
  Use them with:  set -a; . .kafka-local/scram.env; set +a

librdkafka (rdkafka crate) settings for the SASL_SSL listener:
  bootstrap.servers=\$KAFKA_BOOTSTRAP_SERVERS  security.protocol=SASL_SSL
  sasl.mechanisms=SCRAM-SHA-512  sasl.username=\$KAFKA_USERNAME
  sasl.password=\$KAFKA_PASSWORD  ssl.ca.location=\$KAFKA_SSL_CA_LOCATION
  (the certificate is valid for both 127.0.0.1 and localhost)

Environment overrides (defaults in brackets):
  KAFKA_VERSION [$KAFKA_VERSION]   LOG4J_VERSION [$LOG4J_VERSION]
  KAFKA_LOCAL_CACHE   jar cache [.kafka-local/cache]
  KAFKA_LOCAL_DIR     state directory [.kafka-local]
  KAFKA_PLAINTEXT_PORT [9092]  KAFKA_SCRAM_PORT [9096]  KAFKA_CONTROLLER_PORT [9093]
  KAFKA_MSK_IAM_PORT [9098]  KAFKA_MSK_IAM_REGION [us-east-1]
  KAFKA_MSK_IAM_TOKEN_MAX_AGE_S [60] (0: honour a token until it expires)
  KAFKA_AUTO_CREATE_TOPICS [false]  KAFKA_SCRAM_USER [microbatch]
  KAFKA_CONSUMER_SESSION_TIMEOUT_MS [10000]  KAFKA_CONSUMER_HEARTBEAT_MS [500]
  KAFKA_SHARE_SESSION_TIMEOUT_MS [10000]  KAFKA_SHARE_HEARTBEAT_MS [1000]
  KAFKA_SHARE_MIN_RECORD_LOCK_MS [1000]
  KAFKA_HEAP_OPTS [-Xmx512m -Xms256m]  KAFKA_TOOL_HEAP_OPTS [-Xmx512m]
  KAFKA_LOCAL_START_TIMEOUT [90]  KAFKA_LOCAL_STOP_TIMEOUT [30]  JAVA_HOME

Examples:
  scripts/kafka-local.sh start
  scripts/kafka-local.sh tool topics --bootstrap-server 127.0.0.1:9092 \\
      --create --topic events --partitions 3
  scripts/kafka-local.sh tool topics --bootstrap-server 127.0.0.1:9096 \\
      --command-config .kafka-local/client-scram.properties --list
  scripts/kafka-local.sh tool consumer-perf-test --bootstrap-server 127.0.0.1:9096 \\
      --consumer.config .kafka-local/client-scram.properties --topic events --messages 100000
  (the perf tools take --consumer.config / --producer.config instead of --command-config)
  scripts/kafka-local.sh stop
EOF
}

# ---------------------------------------------------------------- helpers

need() {
	command -v "$1" >/dev/null 2>&1 || die "'$1' is required but not installed${2:+ ($2)}"
}

check_port_number() {
	if ! [[ $2 =~ ^[0-9]+$ ]] || ((10#$2 < 1 || 10#$2 > 65535)); then
		die "$1 must be a port number, got '$2'"
	fi
}

check_settings() {
	check_port_number KAFKA_PLAINTEXT_PORT "$PLAINTEXT_PORT"
	check_port_number KAFKA_SCRAM_PORT "$SCRAM_PORT"
	check_port_number KAFKA_CONTROLLER_PORT "$CONTROLLER_PORT"
	[[ $CONSUMER_SESSION_TIMEOUT_MS =~ ^[0-9]+$ ]] || die "KAFKA_CONSUMER_SESSION_TIMEOUT_MS must be a number of milliseconds"
	[[ $CONSUMER_HEARTBEAT_MS =~ ^[0-9]+$ ]] || die "KAFKA_CONSUMER_HEARTBEAT_MS must be a number of milliseconds"
	[[ $SHARE_SESSION_TIMEOUT_MS =~ ^[0-9]+$ ]] || die "KAFKA_SHARE_SESSION_TIMEOUT_MS must be a number of milliseconds"
	[[ $SHARE_HEARTBEAT_MS =~ ^[0-9]+$ ]] || die "KAFKA_SHARE_HEARTBEAT_MS must be a number of milliseconds"
	[[ $SHARE_MIN_LOCK_MS =~ ^[0-9]+$ ]] || die "KAFKA_SHARE_MIN_RECORD_LOCK_MS must be a number of milliseconds"
	check_port_number KAFKA_MSK_IAM_PORT "$MSK_IAM_PORT"
	if [[ $(printf '%s\n' "$PLAINTEXT_PORT" "$SCRAM_PORT" "$CONTROLLER_PORT" "$MSK_IAM_PORT" | sort -u | wc -l) != 4 ]]; then
		die "KAFKA_PLAINTEXT_PORT, KAFKA_SCRAM_PORT, KAFKA_CONTROLLER_PORT and KAFKA_MSK_IAM_PORT must differ"
	fi
	[[ $MSK_IAM_REGION =~ ^[a-z0-9-]+$ ]] || die "KAFKA_MSK_IAM_REGION must look like us-east-1"
	[[ $MSK_IAM_TOKEN_MAX_AGE =~ ^[0-9]+$ ]] || die "KAFKA_MSK_IAM_TOKEN_MAX_AGE_S must be a number of seconds"
	[[ $AUTO_CREATE_TOPICS == true || $AUTO_CREATE_TOPICS == false ]] ||
		die "KAFKA_AUTO_CREATE_TOPICS must be true or false"
	[[ $SCRAM_USER =~ ^[A-Za-z0-9._-]+$ ]] || die "KAFKA_SCRAM_USER may only contain [A-Za-z0-9._-]"
	# Share groups (KIP-932) are generally available from 4.2 on.
	[[ $KAFKA_VERSION =~ ^4\.([2-9]|[1-9][0-9])\. ]] ||
		log "warning: KAFKA_VERSION=$KAFKA_VERSION is older than 4.2: share groups will not work; this script targets Kafka 4.2 or later"
}

check_java() {
	need "$JAVA" "install a JDK 17+ or set JAVA_HOME"
	local version major
	version=$("$JAVA" -version 2>&1 | awk -F'"' '/version/ {print $2; exit}')
	major=${version%%.*}
	[[ $major == 1 ]] && major=$(cut -d. -f2 <<<"$version")
	if [[ $major =~ ^[0-9]+$ ]] && ((major < 17)); then
		die "Kafka 4.x needs Java 17 or newer; '$JAVA' is version $version"
	fi
}

# Serialise start/stop/reset so parallel test runners do not race.
take_lock() {
	mkdir -p "$STATE_DIR"
	if command -v flock >/dev/null 2>&1; then
		exec 9>"$STATE_DIR/.lock"
		flock -w 600 9 || die "timed out waiting for the lock $STATE_DIR/.lock"
	fi
}

port_open() {
	(: <>"/dev/tcp/$HOST/$1") 2>/dev/null
}

# Print the pid of the broker this script started, if it is still running.
running_pid() {
	[[ -f $PID_FILE ]] || return 1
	local pid args
	pid=$(<"$PID_FILE")
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	kill -0 "$pid" 2>/dev/null || return 1
	# Guard against pid reuse: it must be our kafka.Kafka with our config.
	if [[ -r /proc/$pid/cmdline ]]; then
		args=$(tr '\0' ' ' <"/proc/$pid/cmdline")
	else
		args=$(ps -p "$pid" -o args= 2>/dev/null) || return 1
	fi
	[[ $args == *kafka.Kafka* && $args == *"$SERVER_PROPS"* ]] || return 1
	printf '%s\n' "$pid"
}

random_secret() {
	openssl rand -hex 24
}

# ---------------------------------------------------------------- jars

write_pom() {
	cat >"$CACHE_DIR/pom.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by scripts/kafka-local.sh: only used to fetch the broker's jars. -->
<project xmlns="http://maven.apache.org/POM/4.0.0"
         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0 https://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.microbatch</groupId>
  <artifactId>kafka-local-deps</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka-tools</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <!-- Kafka 4.x is built against slf4j-api 1.7.x, so the matching log4j binding
         is log4j-slf4j-impl (log4j-slf4j2-impl would need slf4j-api 2.x). -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
}

# List the .class entries of the Kafka jars, to resolve tool class names.
build_class_index() {
	local jar tmp=$CLASS_INDEX.tmp
	: >"$tmp"
	for jar in "$LIB_DIR"/kafka*.jar; do
		[[ -e $jar ]] || continue
		if command -v unzip >/dev/null 2>&1; then
			unzip -Z1 "$jar" >>"$tmp"
		elif command -v jar >/dev/null 2>&1; then
			jar tf "$jar" >>"$tmp"
		else
			rm -f "$tmp"
			return 1
		fi
	done
	grep '\.class$' "$tmp" | grep -v '\$' | sed 's/\.class$//; s#/#.#g' | sort -u >"$CLASS_INDEX"
	rm -f "$tmp"
}

ensure_jars() {
	if [[ -d $LIB_DIR && -f $CACHE_MARKER && $(<"$CACHE_MARKER") == "$CACHE_SPEC" ]]; then
		return 0
	fi
	need mvn "Maven is used to fetch the Kafka jars from Maven Central"
	mkdir -p "$CACHE_DIR"
	log "fetching Kafka $KAFKA_VERSION and log4j $LOG4J_VERSION jars with mvn into $CACHE_DIR (first time only)"
	write_pom
	rm -rf "$LIB_DIR.tmp"
	local started=$SECONDS
	if ! (cd "$CACHE_DIR" && mvn -B -ntp -Dstyle.color=never -f pom.xml \
		"$DEPENDENCY_PLUGIN:copy-dependencies" \
		-DincludeScope=runtime -DoutputDirectory="$LIB_DIR.tmp" -Dmdep.useBaseVersion=true \
		>"$CACHE_DIR/mvn.log" 2>&1); then
		rm -rf "$LIB_DIR.tmp"
		tail -n 30 "$CACHE_DIR/mvn.log" >&2
		die "mvn could not fetch the jars (is KAFKA_VERSION=$KAFKA_VERSION published? full output: $CACHE_DIR/mvn.log)"
	fi
	compgen -G "$LIB_DIR.tmp/kafka_2.13-*.jar" >/dev/null || die "kafka_2.13 jar missing after mvn run"
	rm -rf "$LIB_DIR"
	mv "$LIB_DIR.tmp" "$LIB_DIR"
	build_class_index || log "warning: neither unzip nor jar found; tool class names are not checked"
	printf '%s\n' "$CACHE_SPEC" >"$CACHE_MARKER"
	log "fetched $(find "$LIB_DIR" -name '*.jar' | wc -l) jars in $((SECONDS - started))s"
}

# ---------------------------------------------------------------- config

ensure_secrets() {
	if [[ ! -s $SECRETS_FILE ]]; then
		(
			umask 077
			printf 'SCRAM_PASSWORD=%s\nKEYSTORE_PASSWORD=%s\n' "$(random_secret)" "$(random_secret)" >"$SECRETS_FILE"
		)
	fi
	# State made by an older version of this script has no MSK IAM test
	# credentials yet: add them, keeping everything else.
	if ! grep -q '^MSK_IAM_ACCESS_KEY_ID=' "$SECRETS_FILE"; then
		(
			umask 077
			printf 'MSK_IAM_ACCESS_KEY_ID=AKIA%s\nMSK_IAM_SECRET_ACCESS_KEY=%s\n' \
				"$(openssl rand -hex 8 | tr 'a-f' 'A-F')" "$(openssl rand -base64 30)" >>"$SECRETS_FILE"
		)
	fi
	SCRAM_PASSWORD=$(sed -n 's/^SCRAM_PASSWORD=//p' "$SECRETS_FILE")
	KEYSTORE_PASSWORD=$(sed -n 's/^KEYSTORE_PASSWORD=//p' "$SECRETS_FILE")
	MSK_IAM_ACCESS_KEY_ID=$(sed -n 's/^MSK_IAM_ACCESS_KEY_ID=//p' "$SECRETS_FILE")
	MSK_IAM_SECRET_ACCESS_KEY=$(sed -n 's/^MSK_IAM_SECRET_ACCESS_KEY=//p' "$SECRETS_FILE")
	[[ -n $SCRAM_PASSWORD && -n $KEYSTORE_PASSWORD && -n $MSK_IAM_ACCESS_KEY_ID && -n $MSK_IAM_SECRET_ACCESS_KEY ]] ||
		die "$SECRETS_FILE is incomplete; run 'reset'"
}

ensure_tls() {
	if [[ -s $TLS_DIR/ca.pem && -s $TLS_DIR/broker.p12 ]]; then
		return 0
	fi
	need openssl
	log "creating a throw-away CA and broker certificate in $TLS_DIR"
	rm -rf "$TLS_DIR"
	mkdir -p "$TLS_DIR"
	chmod 755 "$TLS_DIR"
	(
		cd "$TLS_DIR" || exit 1
		umask 077
		cat >openssl.cnf <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = kafka-local
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[broker_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
		openssl req -x509 -new -newkey rsa:2048 -nodes -sha256 -days 3650 \
			-config openssl.cnf -extensions ca_ext -subj "/CN=kafka-local throw-away CA" \
			-keyout ca.key -out ca.pem >>openssl.log 2>&1 &&
			openssl req -new -newkey rsa:2048 -nodes -sha256 \
				-config openssl.cnf -subj "/CN=localhost" \
				-keyout broker.key -out broker.csr >>openssl.log 2>&1 &&
			openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
				-sha256 -days 825 -extfile openssl.cnf -extensions broker_ext \
				-out broker.pem >>openssl.log 2>&1 &&
			KEYSTORE_PASSWORD=$KEYSTORE_PASSWORD openssl pkcs12 -export \
				-in broker.pem -inkey broker.key -certfile ca.pem -name kafka \
				-passout env:KEYSTORE_PASSWORD -out broker.p12 >>openssl.log 2>&1 &&
			chmod 644 ca.pem broker.pem &&
			rm -f broker.csr ca.srl openssl.log
	) || {
		[[ -f $TLS_DIR/openssl.log ]] && cat "$TLS_DIR/openssl.log" >&2
		rm -f "$TLS_DIR/ca.pem" "$TLS_DIR/broker.p12"
		die "openssl failed to create the certificates"
	}
}

# Compile the MSK_IAM listener's token validator when it is missing or older
# than its source.
build_msk_iam_validator() {
	local class_file=$MSK_IAM_CLASSES/${MSK_IAM_CLASS//.//}.class
	if [[ -f $class_file && $class_file -nt $MSK_IAM_SRC ]]; then
		return 0
	fi
	need "$JAVAC" "a JDK (not just a JRE) compiles the MSK IAM token validator"
	log "compiling $(basename "$MSK_IAM_SRC")"
	rm -rf "$MSK_IAM_CLASSES"
	mkdir -p "$MSK_IAM_CLASSES"
	"$JAVAC" -nowarn -d "$MSK_IAM_CLASSES" -cp "$LIB_DIR/*" "$MSK_IAM_SRC" >&2 ||
		die "javac failed on $MSK_IAM_SRC"
}

write_tools_log4j() {
	cat >"$TOOLS_LOG4J" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by scripts/kafka-local.sh: command-line tools log warnings to stderr. -->
<Configuration status="warn">
  <Appenders>
    <Console name="stderr" target="SYSTEM_ERR">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="WARN"><AppenderRef ref="stderr"/></Root>
  </Loggers>
</Configuration>
EOF
}

write_configs() {
	mkdir -p "$CONFIG_DIR" "$DATA_DIR" "$LOG_DIR"
	(
		umask 077
		cat >"$SERVER_PROPS" <<EOF
# Generated by scripts/kafka-local.sh on every start; edits are overwritten.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$CONTROLLER_PORT
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://$HOST:$PLAINTEXT_PORT,SASL_SSL://$HOST:$SCRAM_PORT,MSK_IAM://$HOST:$MSK_IAM_PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$PLAINTEXT_PORT,SASL_SSL://$HOST:$SCRAM_PORT,MSK_IAM://$HOST:$MSK_IAM_PORT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,MSK_IAM:SASL_SSL
inter.broker.listener.name=PLAINTEXT

# SASL_SSL listener: SCRAM-SHA-512 over TLS, like MSK's port 9096.
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
# MSK_IAM listener: SASL_SSL with OAUTHBEARER tokens checked as MSK checks
# IAM tokens (scripts/kafka-local/MskIamTokenValidator.java). Sessions end
# with their token, so clients re-authenticate (KIP-368) with fresh ones.
listener.name.msk_iam.sasl.enabled.mechanisms=OAUTHBEARER
listener.name.msk_iam.oauthbearer.sasl.jaas.config=org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required unsecuredLoginStringClaim_sub="broker" accessKeyId="$MSK_IAM_ACCESS_KEY_ID" secretAccessKey="$MSK_IAM_SECRET_ACCESS_KEY" region="$MSK_IAM_REGION" tokenMaxAgeSeconds="$MSK_IAM_TOKEN_MAX_AGE";
listener.name.msk_iam.oauthbearer.sasl.server.callback.handler.class=$MSK_IAM_CLASS
listener.name.msk_iam.oauthbearer.connections.max.reauth.ms=3600000

# An authorizer, so that a test can deny a principal something (a
# dead-letter topic without WRITE, which the worker must see at start
# through KIP-430's authorized operations). A resource without ACLs is open
# to all, and ANONYMOUS (the PLAINTEXT listener, the controller and the
# test tools) is a super user, so everything else runs as without one.
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=true
super.users=User:ANONYMOUS

ssl.keystore.type=PKCS12
ssl.keystore.location=$TLS_DIR/broker.p12
ssl.keystore.password=$KEYSTORE_PASSWORD
ssl.key.password=$KEYSTORE_PASSWORD
ssl.client.auth=none

# Single-node friendly settings.
log.dirs=$DATA_DIR
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=$AUTO_CREATE_TOPICS
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# Every group protocol is on (classic, consumer, share, streams), each
# enabled by its feature version. The consumer group protocol (KIP-848) has
# the session and heartbeat of an autoscaled group rather than the broker's
# defaults (45 s and 5 s); the minimums are lowered to allow them.
group.consumer.session.timeout.ms=$CONSUMER_SESSION_TIMEOUT_MS
group.consumer.min.session.timeout.ms=$CONSUMER_SESSION_TIMEOUT_MS
group.consumer.heartbeat.interval.ms=$CONSUMER_HEARTBEAT_MS
group.consumer.min.heartbeat.interval.ms=$CONSUMER_HEARTBEAT_MS
# Share groups (KIP-932): the same short session and heartbeat, so a member
# that dies gives its partitions' share back in seconds; acquisition locks
# keep the broker's 30 s default, and a group may set a shorter one.
group.share.session.timeout.ms=$SHARE_SESSION_TIMEOUT_MS
group.share.min.session.timeout.ms=$SHARE_SESSION_TIMEOUT_MS
group.share.heartbeat.interval.ms=$SHARE_HEARTBEAT_MS
group.share.min.heartbeat.interval.ms=$SHARE_HEARTBEAT_MS
group.share.min.record.lock.duration.ms=$SHARE_MIN_LOCK_MS
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=24
EOF
	)
	cat >"$SERVER_LOG4J" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by scripts/kafka-local.sh. -->
<Configuration status="warn">
  <Appenders>
    <RollingFile name="server" fileName="$SERVER_LOG" filePattern="$LOG_DIR/server.log.%i">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <Policies><SizeBasedTriggeringPolicy size="20 MB"/></Policies>
      <DefaultRolloverStrategy max="3"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Root level="INFO"><AppenderRef ref="server"/></Root>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="kafka.authorizer.logger" level="WARN"/>
    <Logger name="state.change.logger" level="WARN"/>
    <Logger name="org.apache.kafka.common.config.AbstractConfig" level="WARN"/>
    <Logger name="org.apache.kafka.clients" level="WARN"/>
    <Logger name="org.apache.kafka.common.metrics" level="WARN"/>
    <Logger name="org.apache.kafka.common.utils.AppInfoParser" level="WARN"/>
    <Logger name="kafka.log.LogCleaner" level="WARN"/>
    <Logger name="org.apache.kafka.storage.internals.log" level="WARN"/>
    <Logger name="kafka.server.KafkaRaftServer" level="INFO"/>
  </Loggers>
</Configuration>
EOF
	write_tools_log4j
}

write_client_files() {
	local ca=$TLS_DIR/ca.pem
	(
		umask 077
		{
			echo "# Generated by scripts/kafka-local.sh. Use: set -a; . .kafka-local/scram.env; set +a"
			printf 'KAFKA_BOOTSTRAP_SERVERS=%q\n' "$HOST:$SCRAM_PORT"
			printf 'KAFKA_SECURITY_PROTOCOL=%q\n' SASL_SSL
			printf 'KAFKA_SASL_MECHANISM=%q\n' SCRAM-SHA-512
			printf 'KAFKA_USERNAME=%q\n' "$SCRAM_USER"
			printf 'KAFKA_PASSWORD=%q\n' "$SCRAM_PASSWORD"
			printf 'KAFKA_SSL_CA_LOCATION=%q\n' "$ca"
		} >"$SCRAM_ENV"
		cat >"$CLIENT_SCRAM_PROPS" <<EOF
# Java client config for the SASL_SSL listener (e.g. tool ... --command-config).
bootstrap.servers=$HOST:$SCRAM_PORT
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="$SCRAM_USER" password="$SCRAM_PASSWORD";
ssl.truststore.type=PEM
ssl.truststore.location=$ca
EOF
	)
	# Clients refresh half-way through a token's lifetime; half the
	# listener's honour period keeps them within it.
	local iam_lifetime=900
	if ((MSK_IAM_TOKEN_MAX_AGE > 0)); then
		iam_lifetime=$((MSK_IAM_TOKEN_MAX_AGE / 2))
		((iam_lifetime < 10)) && iam_lifetime=10
		((iam_lifetime > 900)) && iam_lifetime=900
	fi
	(
		umask 077
		{
			echo "# Generated by scripts/kafka-local.sh. Use: set -a; . .kafka-local/msk-iam.env; set +a"
			echo "# Test credentials that only this broker's MSK_IAM listener accepts."
			printf 'KAFKA_BOOTSTRAP_SERVERS=%q\n' "$HOST:$MSK_IAM_PORT"
			printf 'KAFKA_SECURITY_PROTOCOL=%q\n' SASL_SSL
			printf 'KAFKA_SASL_MECHANISM=%q\n' AWS_MSK_IAM
			printf 'AWS_REGION=%q\n' "$MSK_IAM_REGION"
			printf 'AWS_ACCESS_KEY_ID=%q\n' "$MSK_IAM_ACCESS_KEY_ID"
			printf 'AWS_SECRET_ACCESS_KEY=%q\n' "$MSK_IAM_SECRET_ACCESS_KEY"
			printf 'KAFKA_SSL_CA_LOCATION=%q\n' "$ca"
			printf 'MSK_IAM_TOKEN_LIFETIME_S=%q\n' "$iam_lifetime"
			printf 'KAFKA_MSK_IAM_TOKEN_MAX_AGE_S=%q\n' "$MSK_IAM_TOKEN_MAX_AGE"
		} >"$MSK_IAM_ENV"
	)
	{
		echo "# Generated by scripts/kafka-local.sh. Use: set -a; . .kafka-local/plaintext.env; set +a"
		printf 'KAFKA_BOOTSTRAP_SERVERS=%q\n' "$HOST:$PLAINTEXT_PORT"
		printf 'KAFKA_SECURITY_PROTOCOL=%q\n' PLAINTEXT
	} >"$PLAINTEXT_ENV"
	cat >"$CLIENT_PLAINTEXT_PROPS" <<EOF
# Java client config for the PLAINTEXT listener.
bootstrap.servers=$HOST:$PLAINTEXT_PORT
security.protocol=PLAINTEXT
EOF
}

classpath() {
	printf '%s/*' "$LIB_DIR"
}

# The broker's class path: the jars and the MSK IAM token validator.
broker_classpath() {
	printf '%s/*:%s' "$LIB_DIR" "$MSK_IAM_CLASSES"
}

format_storage() {
	[[ -f $DATA_DIR/meta.properties ]] && return 0
	log "formatting $DATA_DIR with SCRAM-SHA-512 user '$SCRAM_USER'"
	local cluster_id out
	cluster_id=$("$JAVA" -Dlog4j2.configurationFile="$TOOLS_LOG4J" -cp "$(classpath)" \
		kafka.tools.StorageTool random-uuid) || die "kafka-storage random-uuid failed"
	cluster_id=$(tail -n 1 <<<"$cluster_id")
	if ! out=$("$JAVA" -Dlog4j2.configurationFile="$TOOLS_LOG4J" -cp "$(classpath)" \
		kafka.tools.StorageTool format --config "$SERVER_PROPS" --cluster-id "$cluster_id" \
		--add-scram "SCRAM-SHA-512=[name=$SCRAM_USER,password=$SCRAM_PASSWORD]" 2>&1); then
		printf '%s\n' "$out" >&2
		die "kafka-storage format failed"
	fi
}

# Print the finalized level of a feature (0 when it is not finalized).
feature_level() {
	local out
	out=$(run_java_tool org.apache.kafka.tools.FeatureCommand --bootstrap-server "$HOST:$PLAINTEXT_PORT" describe) ||
		die "kafka-features describe failed: $out"
	awk -v f="$1" '$1 == "Feature:" && $2 == f {
		for (i = 3; i < NF; i++) if ($i == "FinalizedVersionLevel:") { print $(i + 1); exit }
	}' <<<"$out"
}

# Storage formatted by Kafka 4.1 or older finalized share.version=0, and the
# broker then refuses share groups. Upgrade such a cluster to the running
# release's feature levels (as an operator would after a rolling upgrade)
# instead of leaving it silently without share groups.
ensure_share_groups() {
	local level release
	level=$(feature_level share.version)
	[[ -n $level && $level != 0 ]] && return 0
	release=$(sed -E 's/^([0-9]+\.[0-9]+).*/\1/' <<<"$KAFKA_VERSION")
	log "the data in $DATA_DIR has share.version=${level:-unknown} (formatted by an older Kafka); upgrading its features to release $release"
	run_java_tool org.apache.kafka.tools.FeatureCommand --bootstrap-server "$HOST:$PLAINTEXT_PORT" \
		upgrade --release-version "$release" >&2 || die "kafka-features upgrade --release-version $release failed"
	level=$(feature_level share.version)
	[[ -n $level && $level != 0 ]] ||
		die "share.version is still ${level:-unknown} after the upgrade; run 'scripts/kafka-local.sh reset' to remake the data"
}

# Run a Kafka tool class in the foreground (cmd_tool execs instead).
run_java_tool() {
	local -a heap
	read -r -a heap <<<"$TOOL_HEAP_OPTS"
	"$JAVA" "${heap[@]}" -Djava.awt.headless=true \
		-Dlog4j2.configurationFile="$TOOLS_LOG4J" -cp "$(classpath)" "$@" 2>&1
}

# ---------------------------------------------------------------- commands

print_connection_info() {
	cat <<EOF
  PLAINTEXT  $HOST:$PLAINTEXT_PORT   (env: ${PLAINTEXT_ENV#"$ROOT"/})
  SASL_SSL   $HOST:$SCRAM_PORT   SCRAM-SHA-512 user '$SCRAM_USER' (env: ${SCRAM_ENV#"$ROOT"/}, CA: ${TLS_DIR#"$ROOT"/}/ca.pem)
  MSK_IAM    $HOST:$MSK_IAM_PORT   SASL_SSL + AWS_MSK_IAM, region $MSK_IAM_REGION (env: ${MSK_IAM_ENV#"$ROOT"/})
EOF
}

show_failure_logs() {
	if [[ -s $SERVER_LOG ]]; then
		log "last lines of $SERVER_LOG:"
		tail -n 40 "$SERVER_LOG" >&2
	fi
	if [[ -s $STDOUT_LOG ]]; then
		log "last lines of $STDOUT_LOG:"
		tail -n 20 "$STDOUT_LOG" >&2
	fi
}

cmd_start() {
	check_settings
	take_lock
	local pid
	if pid=$(running_pid); then
		echo "kafka-local: already running (pid $pid)"
		print_connection_info
		return 0
	fi
	rm -f "$PID_FILE"
	check_java
	need openssl
	local port
	for port in "$PLAINTEXT_PORT" "$SCRAM_PORT" "$CONTROLLER_PORT" "$MSK_IAM_PORT"; do
		if port_open "$port"; then
			die "port $port on $HOST is already in use by another process (set KAFKA_PLAINTEXT_PORT / KAFKA_SCRAM_PORT / KAFKA_CONTROLLER_PORT / KAFKA_MSK_IAM_PORT)"
		fi
	done
	ensure_jars
	ensure_secrets
	ensure_tls
	build_msk_iam_validator
	write_configs
	write_client_files
	format_storage

	local log_offset=0
	[[ -f $SERVER_LOG ]] && log_offset=$(wc -c <"$SERVER_LOG")
	local -a heap
	read -r -a heap <<<"$HEAP_OPTS"
	log "starting Kafka $KAFKA_VERSION (logs: $SERVER_LOG)"
	nohup "$JAVA" "${heap[@]}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
		-XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
		-Dlog4j2.configurationFile="$SERVER_LOG4J" -Dkafka.logs.dir="$LOG_DIR" \
		-cp "$(broker_classpath)" kafka.Kafka "$SERVER_PROPS" \
		</dev/null >"$STDOUT_LOG" 2>&1 9>&- &
	pid=$!
	echo "$pid" >"$PID_FILE"

	local started=$SECONDS ready_log=false
	while ((SECONDS - started < START_TIMEOUT)); do
		if ! kill -0 "$pid" 2>/dev/null; then
			rm -f "$PID_FILE"
			show_failure_logs
			die "Kafka exited during startup"
		fi
		if ! $ready_log && [[ -f $SERVER_LOG ]]; then
			# The log may have been rolled over since we noted its size.
			(($(wc -c <"$SERVER_LOG") < log_offset)) && log_offset=0
			# grep -q stops at the first match, and tail, still writing a
			# long log (a broker with many groups logs each at start), dies
			# of SIGPIPE: under pipefail that would read as "not started".
			if { tail -c +"$((log_offset + 1))" "$SERVER_LOG" || true; } | grep -q 'Kafka Server started'; then
				ready_log=true
			fi
		fi
		if $ready_log && port_open "$PLAINTEXT_PORT" && port_open "$SCRAM_PORT" && port_open "$MSK_IAM_PORT"; then
			ensure_share_groups
			echo "kafka-local: Kafka $KAFKA_VERSION started (pid $pid) in $((SECONDS - started))s"
			print_connection_info
			return 0
		fi
		sleep 0.5
	done
	show_failure_logs
	log "Kafka did not become ready within ${START_TIMEOUT}s; stopping it"
	stop_pid "$pid"
	rm -f "$PID_FILE"
	exit 1
}

stop_pid() {
	local pid=$1 waited=0
	kill -TERM "$pid" 2>/dev/null || return 0
	while kill -0 "$pid" 2>/dev/null; do
		if ((waited >= STOP_TIMEOUT * 2)); then
			log "pid $pid did not stop within ${STOP_TIMEOUT}s; sending SIGKILL"
			kill -KILL "$pid" 2>/dev/null || true
			sleep 0.5
			break
		fi
		sleep 0.5
		waited=$((waited + 1))
	done
}

cmd_stop() {
	take_lock
	local pid
	if pid=$(running_pid); then
		log "stopping Kafka (pid $pid)"
		stop_pid "$pid"
		rm -f "$PID_FILE"
		echo "kafka-local: stopped"
	else
		rm -f "$PID_FILE"
		echo "kafka-local: not running"
	fi
}

cmd_status() {
	local pid
	if pid=$(running_pid); then
		echo "kafka-local: running (pid $pid, Kafka $KAFKA_VERSION)"
		print_connection_info
		return 0
	fi
	echo "kafka-local: not running"
	return 3
}

cmd_logs() {
	local follow=false lines=100
	while (($#)); do
		case $1 in
		-f | --follow) follow=true ;;
		-n | --lines)
			[[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || die "logs: $1 needs a number"
			lines=$2
			shift
			;;
		*) die "logs: unknown argument '$1' (use: logs [-f] [-n N])" ;;
		esac
		shift
	done
	if $follow; then
		exec tail -n "$lines" -F "$SERVER_LOG"
	fi
	[[ -f $SERVER_LOG ]] || die "no log yet at $SERVER_LOG"
	tail -n "$lines" "$SERVER_LOG"
}

cmd_reset() {
	cmd_stop
	log "deleting data, logs, certificates and credentials in $STATE_DIR (keeping the jar cache)"
	rm -rf "$DATA_DIR" "$LOG_DIR" "$TLS_DIR" "$CONFIG_DIR" "$MSK_IAM_CLASSES"
	rm -f "$SECRETS_FILE" "$SCRAM_ENV" "$PLAINTEXT_ENV" "$CLIENT_SCRAM_PROPS" "$CLIENT_PLAINTEXT_PROPS" "$MSK_IAM_ENV" "$PID_FILE"
	echo "kafka-local: reset done"
}

tool_candidates() {
	case $1 in
	topics) echo org.apache.kafka.tools.TopicCommand kafka.admin.TopicCommand ;;
	configs) echo org.apache.kafka.tools.ConfigCommand kafka.admin.ConfigCommand ;;
	consumer-groups) echo org.apache.kafka.tools.consumer.group.ConsumerGroupCommand kafka.admin.ConsumerGroupCommand ;;
	consumer-perf-test) echo org.apache.kafka.tools.ConsumerPerformance kafka.tools.ConsumerPerformance ;;
	producer-perf-test) echo org.apache.kafka.tools.ProducerPerformance ;;
	console-producer) echo org.apache.kafka.tools.ConsoleProducer kafka.tools.ConsoleProducer ;;
	console-consumer) echo org.apache.kafka.tools.consumer.ConsoleConsumer kafka.tools.ConsoleConsumer ;;
	get-offsets) echo org.apache.kafka.tools.GetOffsetShell kafka.tools.GetOffsetShell ;;
	delete-records) echo org.apache.kafka.tools.DeleteRecordsCommand kafka.admin.DeleteRecordsCommand ;;
	acls) echo org.apache.kafka.tools.AclCommand kafka.admin.AclCommand ;;
	metadata-quorum) echo org.apache.kafka.tools.MetadataQuorumCommand ;;
	broker-api-versions) echo org.apache.kafka.tools.BrokerApiVersionsCommand kafka.admin.BrokerApiVersionsCommand ;;
	features) echo org.apache.kafka.tools.FeatureCommand ;;
	share-groups) echo org.apache.kafka.tools.consumer.group.ShareGroupCommand ;;
	share-consumer-perf-test) echo org.apache.kafka.tools.ShareConsumerPerformance ;;
	console-share-consumer) echo org.apache.kafka.tools.consumer.ConsoleShareConsumer ;;
	storage) echo kafka.tools.StorageTool ;;
	*.*) echo "$1" ;;
	*) return 1 ;;
	esac
}

cmd_tool() {
	[[ $# -ge 1 ]] || die "tool: missing tool name (see --help)"
	local name=$1 candidates class=
	shift
	candidates=$(tool_candidates "$name") || die "tool: unknown tool '$name' (see --help)"
	check_java
	ensure_jars
	mkdir -p "$CONFIG_DIR"
	[[ -f $TOOLS_LOG4J ]] || write_tools_log4j
	[[ -s $CLASS_INDEX ]] || build_class_index || true
	local c
	for c in $candidates; do
		if [[ ! -s $CLASS_INDEX ]] || grep -qxF "$c" "$CLASS_INDEX"; then
			class=$c
			break
		fi
	done
	[[ -n $class ]] || die "tool: none of [$candidates] exists in Kafka $KAFKA_VERSION"
	local -a heap
	read -r -a heap <<<"$TOOL_HEAP_OPTS"
	exec "$JAVA" "${heap[@]}" -Djava.awt.headless=true \
		-Dlog4j2.configurationFile="$TOOLS_LOG4J" -cp "$(classpath)" "$class" "$@"
}

# Runs a single-file Java program against the broker's jars (kafka-clients
# and all), compiled in memory by the java launcher.
cmd_java_source() {
	[[ $# -ge 1 ]] || die "java-source: missing the .java file (see --help)"
	local source=$1
	shift
	[[ -f $source ]] || die "java-source: no file $source"
	check_java
	ensure_jars
	mkdir -p "$CONFIG_DIR"
	[[ -f $TOOLS_LOG4J ]] || write_tools_log4j
	local -a heap
	read -r -a heap <<<"$TOOL_HEAP_OPTS"
	exec "$JAVA" "${heap[@]}" -Djava.awt.headless=true \
		-Dlog4j2.configurationFile="$TOOLS_LOG4J" -cp "$(classpath)" "$source" "$@"
}

main() {
	local cmd=${1:-}
	[[ $# -gt 0 ]] && shift
	case $cmd in
	start) cmd_start "$@" ;;
	stop) cmd_stop "$@" ;;
	status) cmd_status "$@" ;;
	logs) cmd_logs "$@" ;;
	reset) cmd_reset "$@" ;;
	tool) cmd_tool "$@" ;;
	java-source) cmd_java_source "$@" ;;
	help | -h | --help) usage ;;
	"")
		usage >&2
		exit 2
		;;
	*)
		log "unknown command '$cmd'"
		usage >&2
		exit 2
		;;
	esac
}

main "$@"
