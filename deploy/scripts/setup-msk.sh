#!/usr/bin/env bash
# setup-msk.sh - an Amazon MSK cluster for microbatch, with the AWS CLI:
# SASL/SCRAM-SHA-512 over TLS (port 9096), its credentials in a Secrets
# Manager secret named AmazonMSK_... encrypted with a customer managed KMS
# key, the secret associated with the cluster, and port 9096 opened to the
# EKS workers' security group. With --auth iam: IAM access control (port
# 9098) instead, no secret, and the IAM policies of the workers and of KEDA.
# Run `deploy/scripts/setup-msk.sh --help`.
#
# --dry-run prints every AWS CLI command (and the JSON it would pass) and runs
# none; values that earlier commands would return show as <placeholders>.
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
IAM_OVERLAY=$SCRIPT_DIR/../k8s/overlays/msk-iam

AUTH=${MSK_AUTH:-scram}
TOPIC=${KAFKA_TOPIC:-events}
GROUP=${CONSUMER_GROUP:-microbatch}
REGION=${AWS_REGION:-${AWS_DEFAULT_REGION:-}}
CLUSTER_NAME=${MSK_CLUSTER_NAME:-microbatch}
SUBNET_IDS=${MSK_SUBNET_IDS:-}
SECURITY_GROUP_ID=${MSK_SECURITY_GROUP_ID:-}
CLIENT_SECURITY_GROUP_ID=${MSK_CLIENT_SECURITY_GROUP_ID:-}
CLIENT_CIDR=${MSK_CLIENT_CIDR:-}
KAFKA_VERSION=${MSK_KAFKA_VERSION:-3.7.x}
INSTANCE_TYPE=${MSK_INSTANCE_TYPE:-kafka.m5.large}
VOLUME_SIZE=${MSK_VOLUME_SIZE:-100}
BROKERS=${MSK_BROKERS:-}
SCRAM_USERNAME=${MSK_SCRAM_USERNAME:-microbatch}
WAIT_MINUTES=${MSK_WAIT_MINUTES:-60}
DRY_RUN=false

log() { printf 'setup-msk: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}
usage_error() {
	log "error: $*"
	log "see deploy/scripts/setup-msk.sh --help"
	exit 2
}

usage() {
	cat <<EOF
Usage: deploy/scripts/setup-msk.sh [options]

Creates, in this order (each step reuses what an earlier run already made),
with --auth scram (the default):
  1. a customer managed KMS key (with rotation) and alias alias/<cluster>-msk-scram:
     MSK accepts SCRAM secrets only when a customer managed key encrypts them;
  2. a Secrets Manager secret 'AmazonMSK_<cluster>' (the prefix MSK requires)
     holding {"username": ..., "password": <32 random characters>};
  3. the MSK cluster: SASL/SCRAM on, unauthenticated access off, IAM off,
     TLS between clients and brokers and inside the cluster;
  4. an ingress rule on the brokers' security group: TCP 9096 from the
     EKS workers' security group (or a CIDR);
  5. waits for the cluster to be ACTIVE (20-40 minutes) and associates the
     secret with it;
  6. prints the SCRAM bootstrap brokers and the kubectl command that copies
     the credentials into the Kubernetes Secret.
The password is never printed, and never on a command line: it goes to the
AWS CLI in a file readable only by you, deleted on exit.

With --auth iam: no KMS key and no secret; the cluster has IAM access
control on (SASL/SCRAM and unauthenticated access off), port 9098 is
opened, and two customer managed IAM policies are created from
deploy/k8s/overlays/msk-iam/{iam-policy,keda-iam-policy}.json for this
cluster, --topic and --group: microbatch-<cluster>-worker (for the workers'
role, IRSA or EKS Pod Identity) and microbatch-<cluster>-keda (for KEDA's
operator role). It prints how to attach them.

Options (or the environment variable in brackets):
  --auth scram|iam              [MSK_AUTH]                    [$AUTH]
  --region R                    [AWS_REGION]                  required
  --cluster-name N              [MSK_CLUSTER_NAME]            [$CLUSTER_NAME]
  --subnets ID,ID,...           [MSK_SUBNET_IDS]              required: private subnets
                                in 2 or 3 AZs of the EKS VPC, one broker per subnet
  --security-group ID           [MSK_SECURITY_GROUP_ID]       required: for the brokers
  --client-security-group ID    [MSK_CLIENT_SECURITY_GROUP_ID] the EKS nodes' (or pods')
                                security group, allowed to reach port 9096 (iam: 9098)
  --client-cidr CIDR            [MSK_CLIENT_CIDR]             instead of a group
  --kafka-version V             [MSK_KAFKA_VERSION]           [$KAFKA_VERSION]
                                (aws kafka list-kafka-versions)
  --instance-type T             [MSK_INSTANCE_TYPE]           [$INSTANCE_TYPE]
  --volume-size GIB             [MSK_VOLUME_SIZE]             [$VOLUME_SIZE]
  --brokers N                   [MSK_BROKERS]                 [one per subnet]
  --scram-username U            [MSK_SCRAM_USERNAME]          [$SCRAM_USERNAME]
  --topic T                     [KAFKA_TOPIC]                 [$TOPIC] (iam: the policies' topic;
                                its dead letters go to T.dlq)
  --group G                     [CONSUMER_GROUP]              [$GROUP] (iam: the policies' group)
  --wait-minutes M              [MSK_WAIT_MINUTES]            [$WAIT_MINUTES]
  --dry-run                     Print every command; run none (needs no AWS access)
  -h, --help                    Show this help

Example:
  deploy/scripts/setup-msk.sh --dry-run --region us-east-1 \\
      --subnets subnet-0123456789abcdef0,subnet-0123456789abcdef1,subnet-0123456789abcdef2 \\
      --security-group sg-0123456789abcdef0 --client-security-group sg-0fedcba9876543210
EOF
}

while (($#)); do
	case $1 in
	--auth) AUTH=${2:?}; shift 2 ;;
	--topic) TOPIC=${2:?}; shift 2 ;;
	--group) GROUP=${2:?}; shift 2 ;;
	--region) REGION=${2:?}; shift 2 ;;
	--cluster-name) CLUSTER_NAME=${2:?}; shift 2 ;;
	--subnets) SUBNET_IDS=${2:?}; shift 2 ;;
	--security-group) SECURITY_GROUP_ID=${2:?}; shift 2 ;;
	--client-security-group) CLIENT_SECURITY_GROUP_ID=${2:?}; shift 2 ;;
	--client-cidr) CLIENT_CIDR=${2:?}; shift 2 ;;
	--kafka-version) KAFKA_VERSION=${2:?}; shift 2 ;;
	--instance-type) INSTANCE_TYPE=${2:?}; shift 2 ;;
	--volume-size) VOLUME_SIZE=${2:?}; shift 2 ;;
	--brokers) BROKERS=${2:?}; shift 2 ;;
	--scram-username) SCRAM_USERNAME=${2:?}; shift 2 ;;
	--wait-minutes) WAIT_MINUTES=${2:?}; shift 2 ;;
	--dry-run) DRY_RUN=true; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage_error "unknown argument: $1" ;;
	esac
done

# Validate everything before the first AWS call: the values end up in JSON
# and on command lines, so they must be exactly what they claim to be.
case $AUTH in
scram) PORT=9096 ;;
iam) PORT=9098 ;;
*) usage_error "--auth: scram or iam, got '$AUTH'" ;;
esac
[[ $TOPIC =~ ^[A-Za-z0-9._-]{1,249}$ ]] || usage_error "--topic: letters, digits, '.', '_', '-' only: '$TOPIC'"
[[ $GROUP =~ ^[A-Za-z0-9._-]{1,255}$ ]] || usage_error "--group: letters, digits, '.', '_', '-' only: '$GROUP'"
[[ -n $REGION ]] || usage_error "--region (or AWS_REGION) is required"
[[ $REGION =~ ^[a-z]{2}(-[a-z]+)+-[0-9]+$ ]] || usage_error "--region: not an AWS region: '$REGION'"
[[ $CLUSTER_NAME =~ ^[A-Za-z][A-Za-z0-9-]{0,63}$ ]] ||
	usage_error "--cluster-name: 1-64 letters, digits and hyphens, starting with a letter: '$CLUSTER_NAME'"
[[ -n $SUBNET_IDS ]] || usage_error "--subnets (or MSK_SUBNET_IDS) is required"
IFS=, read -r -a SUBNETS <<<"$SUBNET_IDS"
((${#SUBNETS[@]} >= 2 && ${#SUBNETS[@]} <= 3)) || usage_error "--subnets: give 2 or 3 subnets (one per AZ), got ${#SUBNETS[@]}"
for s in "${SUBNETS[@]}"; do
	[[ $s =~ ^subnet-[0-9a-f]{8,17}$ ]] || usage_error "--subnets: not a subnet ID: '$s'"
done
[[ -n $SECURITY_GROUP_ID ]] || usage_error "--security-group (or MSK_SECURITY_GROUP_ID) is required"
[[ $SECURITY_GROUP_ID =~ ^sg-[0-9a-f]{8,17}$ ]] || usage_error "--security-group: not a security group ID: '$SECURITY_GROUP_ID'"
if [[ -n $CLIENT_SECURITY_GROUP_ID ]]; then
	[[ $CLIENT_SECURITY_GROUP_ID =~ ^sg-[0-9a-f]{8,17}$ ]] ||
		usage_error "--client-security-group: not a security group ID: '$CLIENT_SECURITY_GROUP_ID'"
	[[ -z $CLIENT_CIDR ]] || usage_error "give --client-security-group or --client-cidr, not both"
elif [[ -n $CLIENT_CIDR ]]; then
	[[ $CLIENT_CIDR =~ ^([0-9]{1,3}\.){3}[0-9]{1,3}/([0-9]|[12][0-9]|3[0-2])$ ]] ||
		usage_error "--client-cidr: not an IPv4 CIDR: '$CLIENT_CIDR'"
	[[ $CLIENT_CIDR != 0.0.0.0/0 ]] || usage_error "--client-cidr 0.0.0.0/0 would open the brokers to everyone"
else
	usage_error "--client-security-group or --client-cidr is required (who may reach port $PORT)"
fi
[[ $KAFKA_VERSION =~ ^[0-9]+(\.[0-9]+)+(\.x)?(\.kraft)?$|^[0-9]+(\.[0-9]+)*\.x(\.kraft)?$ ]] ||
	usage_error "--kafka-version: not an MSK Kafka version: '$KAFKA_VERSION'"
[[ $INSTANCE_TYPE =~ ^(kafka|express)\.[a-z0-9]+\.[a-z0-9]+$ ]] || usage_error "--instance-type: not an MSK broker type: '$INSTANCE_TYPE'"
[[ $VOLUME_SIZE =~ ^[1-9][0-9]*$ ]] || usage_error "--volume-size: expected GiB, got '$VOLUME_SIZE'"
[[ -n $BROKERS ]] || BROKERS=${#SUBNETS[@]}
if ! [[ $BROKERS =~ ^[1-9][0-9]*$ ]] || ((BROKERS % ${#SUBNETS[@]} != 0)); then
	usage_error "--brokers: must be a multiple of the number of subnets (${#SUBNETS[@]}), got '$BROKERS'"
fi
[[ $SCRAM_USERNAME =~ ^[A-Za-z0-9._-]{1,64}$ ]] || usage_error "--scram-username: letters, digits, '.', '_', '-' only"
[[ $WAIT_MINUTES =~ ^[1-9][0-9]*$ ]] || usage_error "--wait-minutes: expected minutes, got '$WAIT_MINUTES'"

SECRET_NAME=AmazonMSK_$CLUSTER_NAME
KEY_ALIAS=alias/$CLUSTER_NAME-msk-scram

if $DRY_RUN; then
	WORK='<tmpdir>'
else
	command -v aws >/dev/null || die "the AWS CLI is not installed (https://aws.amazon.com/cli/)"
	WORK=$(mktemp -d)
	trap 'rm -rf "$WORK"' EXIT
	chmod 700 "$WORK"
fi
# Set by capture/lookup below.
versions="" secret_arn="" key_id="" password="" cluster_arn="" state="" unprocessed="" bootstrap=""
worker_policy_arn="" keda_policy_arn=""

# Prints a command as a copy-pasteable shell line.
show() {
	local out="" a
	for a in "$@"; do
		if [[ $a =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
			out+="$a "
		else
			out+="'${a//\'/\'\\\'\'}' "
		fi
	done
	printf '%s\n' "${out% }"
}

# run CMD...: print it (stdout in a dry run, stderr otherwise), then run it.
run() {
	if $DRY_RUN; then
		show "$@"
	else
		printf '+ %s\n' "$(show "$@")" >&2
		"$@"
	fi
}

# capture VAR PLACEHOLDER CMD...: like run, and VAR gets the command's output
# (in a dry run: PLACEHOLDER).
capture() {
	local var=$1 placeholder=$2 out
	shift 2
	if $DRY_RUN; then
		show "$@"
		out=$placeholder
	else
		printf '+ %s\n' "$(show "$@")" >&2
		out=$("$@")
	fi
	printf -v "$var" '%s' "$out"
}

# lookup VAR CMD...: like capture, but an empty or "None" answer (or a failed
# look-up) leaves VAR empty. A dry run assumes nothing exists yet.
lookup() {
	local var=$1 out=""
	shift
	if $DRY_RUN; then
		show "$@"
	else
		printf '+ %s\n' "$(show "$@")" >&2
		out=$("$@" 2>/dev/null || true)
		[[ $out != None ]] || out=""
	fi
	printf -v "$var" '%s' "$out"
}

# Writes a file (mode 600) for the AWS CLI; a dry run prints its content as
# comments instead.
write_file() {
	local path=$1 content=$2 line
	if $DRY_RUN; then
		printf '# %s:\n' "$path"
		while IFS= read -r line; do printf '#   %s\n' "$line"; done <<<"$content"
	else
		(
			umask 077
			printf '%s\n' "$content" >"$path"
		)
	fi
}

aws_() { run aws --region "$REGION" "$@"; }

step() {
	if $DRY_RUN; then printf '\n# %s\n' "$*"; else log "$*"; fi
}

if $DRY_RUN; then
	echo "# setup-msk.sh --dry-run: nothing below was run."
	echo "# region=$REGION cluster=$CLUSTER_NAME brokers=$BROKERS kafka=$KAFKA_VERSION auth=$AUTH"
fi

step "0. the Kafka version must be one MSK offers"
# shellcheck disable=SC2016 # backquotes are a JMESPath literal
lookup versions aws --region "$REGION" kafka list-kafka-versions \
	--query 'KafkaVersions[?Status==`ACTIVE`].Version' --output text
if ! $DRY_RUN && ! tr -s '[:space:]' '\n' <<<"$versions" | grep -qx "$KAFKA_VERSION"; then
	die "MSK in $REGION offers no Kafka $KAFKA_VERSION; active versions: $versions"
fi

if [[ $AUTH == scram ]]; then
step "1. KMS key for the SCRAM secret (MSK rejects secrets under the default aws/secretsmanager key)"
lookup secret_arn aws --region "$REGION" secretsmanager describe-secret \
	--secret-id "$SECRET_NAME" --query ARN --output text
if [[ -n $secret_arn ]]; then
	log "secret $SECRET_NAME exists ($secret_arn): reusing it and its KMS key"
else
	lookup key_id aws --region "$REGION" kms describe-key --key-id "$KEY_ALIAS" \
		--query KeyMetadata.KeyId --output text
	if [[ -z $key_id ]]; then
		capture key_id '<kms-key-id>' aws --region "$REGION" kms create-key \
			--description "microbatch: MSK SCRAM secret of cluster $CLUSTER_NAME" \
			--tags TagKey=project,TagValue=microbatch \
			--query KeyMetadata.KeyId --output text
		aws_ kms enable-key-rotation --key-id "$key_id"
		aws_ kms create-alias --alias-name "$KEY_ALIAS" --target-key-id "$key_id"
	fi

	step "2. the secret $SECRET_NAME (name prefix AmazonMSK_ is required by MSK)"
	capture password '<generated>' aws --region "$REGION" secretsmanager get-random-password \
		--password-length 32 --exclude-punctuation --require-each-included-type \
		--query RandomPassword --output text
	write_file "$WORK/scram-secret.json" "{\"username\": \"$SCRAM_USERNAME\", \"password\": \"$password\"}"
	unset password
	capture secret_arn '<secret-arn>' aws --region "$REGION" secretsmanager create-secret \
		--name "$SECRET_NAME" \
		--description "microbatch: SASL/SCRAM credentials for MSK cluster $CLUSTER_NAME" \
		--kms-key-id "$key_id" \
		--secret-string "file://$WORK/scram-secret.json" \
		--tags Key=project,Value=microbatch \
		--query ARN --output text
	$DRY_RUN || rm -f "$WORK/scram-secret.json"
fi
else
	step "1-2. no KMS key and no secret: with IAM access control each pod signs its own tokens"
fi

if [[ $AUTH == iam ]]; then scram_on=false iam_on=true; else scram_on=true iam_on=false; fi
step "3. the MSK cluster: SASL/$(tr '[:lower:]' '[:upper:]' <<<"$AUTH") only, TLS in transit"
lookup cluster_arn aws --region "$REGION" kafka list-clusters-v2 \
	--cluster-name-filter "$CLUSTER_NAME" \
	--query "ClusterInfoList[?ClusterName=='$CLUSTER_NAME'].ClusterArn | [0]" --output text
if [[ -n $cluster_arn ]]; then
	log "cluster $CLUSTER_NAME exists ($cluster_arn): reusing it"
else
	subnets_json=$(printf '"%s", ' "${SUBNETS[@]}")
	write_file "$WORK/provisioned.json" "{
  \"BrokerNodeGroupInfo\": {
    \"InstanceType\": \"$INSTANCE_TYPE\",
    \"ClientSubnets\": [${subnets_json%, }],
    \"SecurityGroups\": [\"$SECURITY_GROUP_ID\"],
    \"StorageInfo\": {\"EbsStorageInfo\": {\"VolumeSize\": $VOLUME_SIZE}}
  },
  \"KafkaVersion\": \"$KAFKA_VERSION\",
  \"NumberOfBrokerNodes\": $BROKERS,
  \"ClientAuthentication\": {
    \"Sasl\": {\"Scram\": {\"Enabled\": $scram_on}, \"Iam\": {\"Enabled\": $iam_on}},
    \"Unauthenticated\": {\"Enabled\": false}
  },
  \"EncryptionInfo\": {
    \"EncryptionInTransit\": {\"ClientBroker\": \"TLS\", \"InCluster\": true}
  },
  \"EnhancedMonitoring\": \"DEFAULT\"
}"
	capture cluster_arn '<cluster-arn>' aws --region "$REGION" kafka create-cluster-v2 \
		--cluster-name "$CLUSTER_NAME" \
		--provisioned "file://$WORK/provisioned.json" \
		--tags project=microbatch \
		--query ClusterArn --output text
fi

step "4. port $PORT (SASL/$AUTH over TLS) from the clients to the brokers"
if [[ -n $CLIENT_SECURITY_GROUP_ID ]]; then
	source_args=(--source-group "$CLIENT_SECURITY_GROUP_ID")
else
	source_args=(--cidr "$CLIENT_CIDR")
fi
if $DRY_RUN; then
	aws_ ec2 authorize-security-group-ingress --group-id "$SECURITY_GROUP_ID" \
		--protocol tcp --port "$PORT" "${source_args[@]}"
else
	printf '+ %s\n' "$(show aws --region "$REGION" ec2 authorize-security-group-ingress \
		--group-id "$SECURITY_GROUP_ID" --protocol tcp --port "$PORT" "${source_args[@]}")" >&2
	if ! err=$(aws --region "$REGION" ec2 authorize-security-group-ingress --group-id "$SECURITY_GROUP_ID" \
		--protocol tcp --port "$PORT" "${source_args[@]}" 2>&1 >/dev/null); then
		grep -q 'InvalidPermission.Duplicate' <<<"$err" || die "$err"
		log "the rule exists already"
	fi
fi

step "5. wait for ACTIVE (repeated every 30 s, at most $WAIT_MINUTES minutes)${secret_arn:+, then associate the secret}"
deadline=$((SECONDS + WAIT_MINUTES * 60))
while :; do
	capture state ACTIVE aws --region "$REGION" kafka describe-cluster-v2 \
		--cluster-arn "$cluster_arn" --query ClusterInfo.State --output text
	case $state in
	ACTIVE) break ;;
	CREATING | UPDATING) ;;
	*) die "cluster $cluster_arn is $state" ;;
	esac
	((SECONDS < deadline)) || die "cluster not ACTIVE after $WAIT_MINUTES minutes (state $state); run again later"
	sleep 30
done
if [[ $AUTH == scram ]]; then
	capture unprocessed '' aws --region "$REGION" kafka batch-associate-scram-secret \
		--cluster-arn "$cluster_arn" --secret-arn-list "$secret_arn" \
		--query 'UnprocessedScramSecrets[].ErrorMessage' --output text
	if [[ -n $unprocessed && $unprocessed != None ]]; then
		die "MSK did not associate $secret_arn: $unprocessed"
	fi
fi

step "6. what the workers need"
if [[ $AUTH == iam ]]; then
	capture bootstrap '<bootstrap-brokers-sasl-iam>' aws --region "$REGION" kafka get-bootstrap-brokers \
		--cluster-arn "$cluster_arn" --query BootstrapBrokerStringSaslIam --output text
else
	capture bootstrap '<bootstrap-brokers-sasl-scram>' aws --region "$REGION" kafka get-bootstrap-brokers \
		--cluster-arn "$cluster_arn" --query BootstrapBrokerStringSaslScram --output text
fi

# policy_from TEMPLATE: the template with this cluster's ARNs, topic and group.
policy_from() {
	local account=ACCOUNT_ID uuid=CLUSTER_UUID
	# arn:aws:kafka:<region>:<account>:cluster/<name>/<uuid>
	if [[ $cluster_arn =~ ^arn:aws[a-z-]*:kafka:[a-z0-9-]+:([0-9]{12}):cluster/[^/]+/([A-Za-z0-9-]+)$ ]]; then
		account=${BASH_REMATCH[1]} uuid=${BASH_REMATCH[2]}
	elif $DRY_RUN; then
		account='<account-id>' uuid='<cluster-uuid>'
	else
		die "unexpected cluster ARN '$cluster_arn'"
	fi
	sed -e "s/REGION/$REGION/g" -e "s/ACCOUNT_ID/$account/g" -e "s/CLUSTER_NAME/$CLUSTER_NAME/g" \
		-e "s/CLUSTER_UUID/$uuid/g" -e "s/\/TOPIC\"/\/$TOPIC\"/g" -e "s/\/TOPIC\.dlq\"/\/$TOPIC.dlq\"/g" \
		-e "s/\/GROUP\"/\/$GROUP\"/g" "$1"
}

# ensure_policy VAR NAME FILE: the customer managed policy NAME, created from
# FILE unless it exists; VAR gets its ARN.
ensure_policy() {
	local var=$1 name=$2 file=$3 arn
	lookup arn aws --region "$REGION" iam list-policies --scope Local \
		--query "Policies[?PolicyName=='$name'].Arn | [0]" --output text
	if [[ -n $arn ]]; then
		log "policy $name exists ($arn): reusing it (update it with aws iam create-policy-version if the topic or group changed)"
	else
		write_file "$WORK/$name.json" "$(policy_from "$file")"
		capture arn "<$name-arn>" aws --region "$REGION" iam create-policy \
			--policy-name "$name" \
			--description "microbatch: MSK IAM access to cluster $CLUSTER_NAME, topic $TOPIC, group $GROUP" \
			--policy-document "file://$WORK/$name.json" \
			--tags Key=project,Value=microbatch \
			--query Policy.Arn --output text
	fi
	printf -v "$var" '%s' "$arn"
}

if [[ $AUTH == iam ]]; then
	step "7. IAM policies: the workers' (topic $TOPIC, $TOPIC.dlq, group $GROUP) and KEDA's (read lag)"
	ensure_policy worker_policy_arn "microbatch-$CLUSTER_NAME-worker" "$IAM_OVERLAY/iam-policy.json"
	ensure_policy keda_policy_arn "microbatch-$CLUSTER_NAME-keda" "$IAM_OVERLAY/keda-iam-policy.json"
	cat <<EOF

# Next steps:
# 1. In deploy/k8s/overlays/msk-iam/kustomization.yaml set
#      KAFKA_BOOTSTRAP_SERVERS=$bootstrap
#      AWS_REGION=$REGION
# 2. A role for the workers' ServiceAccount microbatch/microbatch with
#    $worker_policy_arn, either with IRSA:
#      eksctl create iamserviceaccount --cluster <eks-cluster> --namespace microbatch \\
#          --name microbatch --role-name microbatch-$CLUSTER_NAME-msk-iam --role-only \\
#          --attach-policy-arn $worker_policy_arn --approve
#    and its ARN in the overlay's eks.amazonaws.com/role-arn annotation; or with
#    EKS Pod Identity (then delete the annotation):
#      aws eks create-pod-identity-association --cluster-name <eks-cluster> \\
#          --namespace microbatch --service-account microbatch --role-arn <role-arn>
# 3. Attach $keda_policy_arn to KEDA's operator role
#    (the TriggerAuthentication uses podIdentity provider aws).
# 4. deploy/scripts/deploy.sh msk-iam   (no Kubernetes Secret is needed)
EOF
	exit 0
fi

cat <<EOF

# Next steps:
# 1. In deploy/k8s/overlays/msk-scram/kustomization.yaml set
#      KAFKA_BOOTSTRAP_SERVERS=$bootstrap
# 2. Copy the credentials into the Kubernetes Secret (the password goes
#    through a pipe, not your shell history):
#      kubectl create namespace microbatch --dry-run=client -o yaml | kubectl apply -f -
#      aws --region $REGION secretsmanager get-secret-value --secret-id $SECRET_NAME \\
#          --query SecretString --output text | jq -j .password \\
#        | kubectl -n microbatch create secret generic microbatch-kafka \\
#          --from-literal=username=$SCRAM_USERNAME --from-file=password=/dev/stdin
# 3. deploy/scripts/deploy.sh msk-scram
EOF
